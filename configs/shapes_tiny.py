r"""The bundled model: a small CLIP + LLaMA LLaVA trained from scratch on the synthetic benchmark.

Reproduce the shipped weights (15000 steps, about 3 to 4 hours on a 2-core CPU, see README):
  python train.py --config=configs/shapes_tiny.py --workdir=$HOME/runs/shapes_tiny
A one-minute smoke run of the same recipe on a tiny model:
  python train.py --config=configs/shapes_tiny.py:test --workdir=/tmp/shapes_test

Variants (the string after the colon, comma-separated): `test` (tiny, a few steps),
`projector` (only the projector trains), `pdrop` (PyramidDrop's training mode), and
the trained compressors of METHODS.md, each trained whole from scratch (trainable
`all`: the tower must learn to fill the registers or the packer's regions) and
composable with `test`:

`falcon` -- FALCON's ReCompact: 25 visual registers appended to the 100 patches inside
  the ViT; only the registers reach the LLM (4 in the tiny model: 16 patches).
    python train.py --config=configs/shapes_tiny.py:falcon --workdir=$HOME/runs/shapes_falcon
    python train.py --config=configs/shapes_tiny.py:test,falcon --workdir=/tmp/falcon_test
`falcon_crops` -- FALCON whole: images twice as large (320 px; 128 px tiny) split into
  2 x 2 crops at the tower's size plus a thumbnail of the whole image, 5 registers per
  view (1 tiny) that attend across the views of an image in every block (ReAtten);
  25 tokens reach the LLM (5 tiny).
    python train.py --config=configs/shapes_tiny.py:falcon_crops --workdir=$HOME/runs/shapes_falcon_crops
    python train.py --config=configs/shapes_tiny.py:test,falcon_crops --workdir=/tmp/falcon_crops_test
`tokenpacker` -- TokenPacker's region-to-point projector, scale 2: each 2 x 2 region of
  the 10 x 10 grid becomes one token (25; 4 tiny), keys from the upper half of the
  tower's layers (multi-level), the point query from the last.
    python train.py --config=configs/shapes_tiny.py:tokenpacker --workdir=$HOME/runs/shapes_tokenpacker
    python train.py --config=configs/shapes_tiny.py:test,tokenpacker --workdir=/tmp/tokenpacker_test
`llavolta` -- LLaVolta's staged visual context compression: average pooling in the LLM
  (`llavolta` method), relaxed at 1/4, 1/2 and 3/4 of train.steps -- stride 3 before
  decoder layer 1, stride 2 before layer 1, stride 2 before the middle layer -- and none
  for the last quarter (the reference's 4-stage recipe scaled to 4 layers). The stage
  boundaries are computed from train.steps when the config is built: when overriding
  --config.train.steps, override --config.train.reduction too.
    python train.py --config=configs/shapes_tiny.py:llavolta --workdir=$HOME/runs/shapes_llavolta
    python train.py --config=configs/shapes_tiny.py:test,llavolta --workdir=/tmp/llavolta_test
"""

import ml_collections

from vtr_jax import sharding

COMPRESSORS = ("falcon", "falcon_crops", "tokenpacker", "llavolta")


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
      # compute / parameter dtypes of the whole model: "bfloat16" compute keeps float32 master weights
      dtype="float32", param_dtype="float32",
  ))
  # decoder layers: `lax.scan` between the plan's boundaries and their rematerialisation in training
  # (none | full | dots | dots_no_batch; vtr_jax.models.decoder.REMAT_POLICIES); attention by name (auto picks)
  c.model.text.update(scan_layers=True, remat="none", attention="auto")
  c.data = ml_collections.ConfigDict(dict(workers=1, train_examples=0, val_examples=350))
  c.optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup=300, b1=0.9, b2=0.98, weight_decay=0.05, clip=1.0,
                                           final_lr_fraction=0.05))
  c.train = ml_collections.ConfigDict(dict(steps=15000, batch_size=32, log_every=25, eval_every=500,
                                           checkpoint_every=250, keep_checkpoints=2, trainable="all",
                                           # a reduction string, or a schedule 'until:spec|...|spec'
                                           reduction="", query_rows=False,
                                           # training-only scene supervision of the tower (vtr_jax.supervision)
                                           aux_weight=1.0))
  # Device mesh (data, fsdp, tensor) over every device of every process; -1 takes the devices left.
  # Rules map logical axis names to mesh axes (vtr_jax.sharding). E.g. --config.mesh.shape="(2,2,2)".
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules=sharding.DEFAULT_RULES))
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
  small = "test" in variants
  compressors = sorted(variants & set(COMPRESSORS))
  if len(compressors) > 1:
    raise ValueError(f"config variants {compressors} exclude each other: pick one trained compressor")
  if {"pdrop", "llavolta"} <= variants:
    raise ValueError("config variants pdrop and llavolta both set train.reduction: pick one")
  if "falcon" in variants:
    c.model.vision.update(num_registers=4 if small else 25, keep_cls=False)
  if "falcon_crops" in variants:
    v = c.model.vision
    v.update(image_size=2 * v.image_size, crops=2, thumbnail=True, reatten=True, num_registers=1 if small else 5,
             keep_cls=False)
  if variants & {"falcon", "falcon_crops"}:  # the tower hands on registers: no per-patch scene supervision
    c.train.aux_weight = 0.0
  if "tokenpacker" in variants:
    layers = c.model.vision.num_layers
    c.model.vision.update(feature_layers=tuple(range(layers // 2, layers + 1)), keep_cls=False)
    c.model.projector = "tokenpacker:scale=2"
  if "llavolta" in variants:
    q, mid = c.train.steps // 4, c.model.text.num_layers // 2
    c.train.reduction = (f"{q}:llavolta:layer=1,stride=3|{2 * q}:llavolta:layer=1,stride=2|"
                         f"{3 * q}:llavolta:layer={mid},stride=2|none")
  known = ("test", "projector", "pdrop") + COMPRESSORS
  unknown = variants - set(known)
  if unknown:
    raise ValueError(f"unknown config variants {sorted(unknown)}; known: {', '.join(known)}")
  return c
