"""ml_collections config files: `get_config(arg) -> ConfigDict`, selected with --config=configs/<name>.py[:arg]."""
