r"""The bundled model: a small CLIP + LLaMA LLaVA trained from scratch on the synthetic benchmark.

Reproduce the shipped weights (about NN minutes on a 2-core CPU, see README):
  python train.py --config=configs/shapes_tiny.py --workdir=$HOME/runs/shapes_tiny
A one-minute smoke run of the same recipe on a tiny model:
  python train.py --config=configs/shapes_tiny.py:test --workdir=/tmp/shapes_test

Variants (the string after the colon): `test` (tiny, a few steps), `projector`
(only the projector trains), `pdrop` (PyramidDrop's training mode).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "shapes-tiny"
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      # 160 px images in 16 px patches: a 10 x 10 grid (100 patches) plus the class token, which
      # goes to the LLM too (the `full` strategy), so its attention row is trained to mean something.
      vision=dict(kind="clip", image_size=160, patch_size=16, hidden_size=128, intermediate_size=384,
                  num_layers=4, num_heads=4, feature_layers=(-1,), keep_cls=True),
      text=dict(kind="llama", hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                num_kv_heads=2, max_positions=512),
      projector="mlp2x_gelu",
  ))
  c.data = ml_collections.ConfigDict(dict(workers=1, train_examples=0, val_examples=350))
  c.optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup=300, b1=0.9, b2=0.98, weight_decay=0.05, clip=1.0,
                                           final_lr_fraction=0.05))
  c.train = ml_collections.ConfigDict(dict(steps=6000, batch_size=32, log_every=25, eval_every=250,
                                           checkpoint_every=250, keep_checkpoints=2, trainable="all",
                                           # a reduction string, or a schedule 'until:spec|...|spec'
                                           reduction="", query_rows=False))
  variants = set((arg or "").split(",")) - {""}
  if "test" in variants:
    c.model.vision.update(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=2)
    c.model.text.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
    c.data.update(workers=0, val_examples=14)
    c.optim.update(warmup=2)
    c.train.update(steps=8, batch_size=8, log_every=2, eval_every=4, checkpoint_every=2)
  if "projector" in variants:
    c.train.trainable = "projector"
  if "pdrop" in variants:  # PyramidDrop's training mode: a stage after every layer but the last
    stages = "/".join(str(i) for i in range(1, c.model.text.num_layers))
    c.train.update(reduction=f"pdrop:layers={stages},ratio=0.5", query_rows=True)
  unknown = variants - {"test", "projector", "pdrop"}
  if unknown:
    raise ValueError(f"unknown config variants {sorted(unknown)}; known: test, projector, pdrop")
  return c
