"""Ahead-of-time compile of the LLaVA-1.5-7B train step and prefill on a mesh: per-device memory, before
you have the chips.

  python benchmarks/aot_memory.py                              # 7B on 8 CPU devices, meshes below
  python benchmarks/aot_memory.py --mesh=1,8,1 --mesh=2,2,2 --batch=8
  python benchmarks/aot_memory.py --topology=v5e:2x4           # TPU compiler (needs libtpu, not the chips)
  python benchmarks/aot_memory.py --geometry=small --mesh=8,1,1  # seconds: the test's scaled-down model
  python benchmarks/aot_memory.py --devices=1 --mesh=1,1,1 --batch=1 --programs=video,train \
      --attention=reference,chunked --remat=none,full      # one device: a 32-frame clip, training with remat

Every program is `jax.jit(...).lower(ShapeDtypeStruct...).compile()`: the
inputs are abstract (shapes, dtypes and shardings, from `jax.eval_shape`),
so nothing of the model's size is ever allocated. Devices: with
`--topology`, the TPU compiler for that slice (jax.experimental.topologies;
libtpu must be installed, the chips need not be there); otherwise
`--devices` forced host CPU devices, whose compiler assigns buffers its own
way (no TPU layouts, fusion or rematerialisation): read its numbers as an
estimate. Programs:

  train      training.make_train_step: AdamW over every parameter, bf16 compute
             and float32 parameters/moments by default (--dtype, --param_dtype),
             batch --batch, `--text` prompt tokens plus the image
             (`--remat`: one row per decoder rematerialisation policy)
  prefill    placement.predictor: the answer of each sample, without reduction and under
             each of --methods at --budget (each method's `for_budget`: FastV keeps 144 of 576
             tokens after layer 2 at 0.25)
  video      the decoder's prefill of a 32-frame clip (--frames x 196 visual tokens, LLaVA's pooled
             frame, plus --text tokens: 6272 + 64 by default) in --dtype with --dtype parameters
             (inference), last-slot logits, under each --attention implementation (`reference`
             materialises [B, heads, T, T] float32 logits per layer, `chunked` one tile), with the
             decoder's layers scanned and/or looped (--scan=on,off: the scan stacks the weights)

Prints a table of per-device bytes (arguments, outputs, temporaries, aliased
buffers; needed = arguments + outputs + temporaries - aliased) and writes it
as JSON and Markdown to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = 2 ** 30


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--geometry", choices=("7b", "small"), default="7b",
                 help="7b: vtr_jax.flops.llava15_7b(); small: the same shape scaled down (tests)")
  p.add_argument("--mesh", action="append", help="data,fsdp,tensor (repeatable; default 1,8,1 2,4,1 1,4,2)")
  p.add_argument("--devices", type=int, default=8, help="forced host CPU devices (without --topology)")
  p.add_argument("--topology", default="", help="a TPU topology name, e.g. v5e:2x4 or v4:2x2x2")
  p.add_argument("--batch", type=int, default=8, help="global batch")
  p.add_argument("--text", type=int, default=64, help="prompt tokens around the image placeholder")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype")
  p.add_argument("--param_dtype", default="float32")
  p.add_argument("--programs", default="train,prefill")
  p.add_argument("--methods", default="fastv,visionzip", help="prefill also under these methods")
  p.add_argument("--budget", type=float, default=0.25, help="fraction of the visual tokens they keep")
  p.add_argument("--remat", default="none", help="train under each of these decoder remat policies")
  p.add_argument("--frames", type=int, default=32, help="video: frames of 196 visual tokens each")
  p.add_argument("--attention", default="reference,chunked", help="video: attention implementations")
  p.add_argument("--scan", default="on", help="video: decoder layers scanned (on) or looped (off), or both")
  p.add_argument("--suffix", default="", help="appended to the result files' names")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  return p.parse_args(argv)


def geometry(name: str, dtype: str, param_dtype: str):
  from vtr_jax import flops
  cfg = flops.llava15_7b()
  if name == "small":  # the 7B's structure (CLIP-L/14 + LLaMA, MHA) at toy width and depth
    cfg = dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, image_size=56, hidden_size=64, intermediate_size=128,
                                        num_layers=3, num_heads=4),
        text=dataclasses.replace(cfg.text, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3,
                                 num_heads=4, num_kv_heads=4))
  return dataclasses.replace(
      cfg, vision=dataclasses.replace(cfg.vision, dtype=dtype, param_dtype=param_dtype),
      text=dataclasses.replace(cfg.text, dtype=dtype, param_dtype=param_dtype))


def memory(compiled) -> dict[str, float]:
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
  out["needed"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out


def abstract(tree, shardings):
  import jax
  return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def measure(args) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import ml_collections

  from vtr_jax import placement, sharding, training
  from vtr_jax.reduce import registry
  from vtr_jax.models.vlm import VLM

  if args.topology:
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
  else:
    devices = jax.devices()[:args.devices]
  cfg = geometry(args.geometry, args.dtype, args.param_dtype)
  model = VLM(cfg)
  rules = sharding.DEFAULT_RULES
  config = ml_collections.ConfigDict({
      "seed": 0, "optim": dict(lr=2e-5, warmup=30, b1=0.9, b2=0.999, weight_decay=0.0, clip=1.0),
      "train": dict(steps=1000, trainable="all")})
  s, b, t = cfg.vision.image_size, args.batch, args.text
  prompt = {"pixels": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
            "tokens": jax.ShapeDtypeStruct((b, t), jnp.int32), "valid": jax.ShapeDtypeStruct((b, t), bool)}
  train_batch = {**prompt, "targets": jax.ShapeDtypeStruct((b, t), jnp.int32),
                 "loss_mask": jax.ShapeDtypeStruct((b, t), bool)}
  plans = ["none"] + [registry()[m].for_budget(args.budget, cfg).spec() for m in args.methods.split(",") if m]
  variants = {"train": [("none", f"remat={r}") for r in args.remat.split(",")],
              "prefill": [(plan, "") for plan in plans],
              "video": [("none", f"attention={a},scan={sc}") for a in args.attention.split(",")
                        for sc in args.scan.split(",")]}
  unknown = set(args.programs.split(",")) - set(variants)
  if unknown:
    raise ValueError(f"unknown programs {sorted(unknown)}; known: {', '.join(variants)}")
  jobs = [(program, *variant) for program in args.programs.split(",") for variant in variants[program]]
  video_len = args.frames * VIDEO_FRAME_TOKENS + t
  video_batch = {"x": jax.ShapeDtypeStruct((b, video_len, cfg.text.hidden_size), jnp.dtype(args.dtype)),
                 "positions": jax.ShapeDtypeStruct((b, video_len), jnp.int32),
                 "valid": jax.ShapeDtypeStruct((b, video_len), bool),
                 "visual": jax.ShapeDtypeStruct((b, video_len), bool)}
  params_abs = jax.eval_shape(lambda: training.init_params(model, cfg, 0))
  rows = []
  for text in args.mesh or ["1,8,1", "2,4,1", "1,4,2"]:
    shape = sharding.mesh_shape(tuple(int(x) for x in text.split(",")), len(devices))
    mesh = sharding.make_mesh(shape, devices=devices[:math.prod(shape)])
    split = sharding.batch_sharding(mesh, rules, b)
    param_sh = placement.param_shardings(model, mesh, rules)
    report = sharding.replication_report(params_abs, param_sh)
    for program, reduction, variant in jobs:
      t0 = time.perf_counter()
      setting = variant.partition("=")[2]  # `remat=full` -> full; video: `attention=chunked,scan=on`
      if program == "train":
        remat = VLM(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, remat=setting)))
        state, state_sh = training.state_shardings(remat, config, 0.0, mesh, rules)
        step = training.make_train_step(remat, config, None, mesh=mesh, rules=rules, batch_size=b)
        compiled = step.lower(abstract(state, state_sh),
                              abstract(train_batch, {k: split for k in train_batch})).compile()
      elif program == "prefill":
        fn = placement.predictor(model, reduction, mesh, rules, b)
        compiled = fn.lower(abstract(params_abs, param_sh),
                            *abstract(list(prompt.values()), [split] * len(prompt))).compile()
      else:  # video: the decoder alone over a clip-length sequence, parameters in the compute dtype
        options = dict(kv.split("=") for kv in variant.split(","))
        fn = video_prefill(cfg, options["attention"], options["scan"] == "on", args.dtype, mesh, rules)
        infer_params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(args.dtype))
                                              if jnp.issubdtype(a.dtype, jnp.floating) else a, params_abs)
        compiled = fn.lower(abstract(infer_params, param_sh),
                            abstract(video_batch, {k: split for k in video_batch})).compile()
      row = {"mesh": dict(mesh.shape), "program": program, "reduction": reduction, "variant": variant,
             **memory(compiled),
             "param_bytes_per_device": report.per_device_bytes, "param_bytes_replicated": report.replicated_bytes,
             "compile_seconds": round(time.perf_counter() - t0, 1)}
      rows.append(row)
      print(format_row(row), flush=True)
  return rows


VIDEO_FRAME_TOKENS = 196  # one frame of a LLaVA-style video: the 24 x 24 grid pooled to 14 x 14


def video_prefill(cfg, attention: str, scan: bool, dtype: str, mesh, rules):
  """jit(params, batch) -> last-slot logits of the decoder over batch's embeddings (x, positions, valid, visual)."""
  import jax

  from vtr_jax import placement, sharding
  from vtr_jax.models.vlm import VLM
  from vtr_jax.seams import LLMState
  model = VLM(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, attention=attention, scan_layers=scan,
                                                                dtype=dtype, param_dtype=dtype)))

  def run(params, batch):
    with sharding.activate(mesh, rules):
      state = LLMState(batch["x"], batch["positions"], batch["valid"], batch["visual"])
      return model.apply(params, state, method=lambda m, st: m.decoder.prefill(st, last_only=True)[0])

  return jax.jit(run, in_shardings=(placement.param_shardings(model, mesh, rules), None),
                 out_shardings=sharding.replicated(mesh))  # the batch keeps the shardings it comes with


HEADER = (f"{'mesh (d,f,t)':<14}{'program':<9}{'reduction / variant':<31}{'args GiB':>9}{'out GiB':>9}{'temp GiB':>9}"
          f"{'alias GiB':>10}{'needed GiB':>11}{'params/dev':>11}{'replicated':>11}{'compile s':>10}")


def format_row(r: dict) -> str:
  mesh = ",".join(str(v) for v in r["mesh"].values())
  g = lambda k: f"{r[k] / GIB:.3f}"  # noqa: E731
  label = r.get("variant") or r["reduction"]
  return (f"{mesh:<14}{r['program']:<9}{label[:30]:<31}{g('arguments'):>9}{g('outputs'):>9}"
          f"{g('temporaries'):>9}{g('aliased'):>10}{g('needed'):>11}{g('param_bytes_per_device'):>11}"
          f"{g('param_bytes_replicated'):>11}{r['compile_seconds']:>10}")


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if not args.topology:  # host devices must be forced before JAX starts
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  import jax
  print(f"jax {jax.__version__}; {args.geometry} geometry; "
        f"{'TPU topology ' + args.topology if args.topology else f'{args.devices} host CPU devices'}; "
        f"batch {args.batch}, {args.text} text tokens, {args.dtype} compute, {args.param_dtype} parameters")
  print(HEADER)
  rows = measure(args)
  os.makedirs(args.out, exist_ok=True)
  name = f"aot_memory_{args.geometry}_{args.topology.replace(':', '-') or 'cpu'}{args.suffix}"
  meta = {"jax": jax.__version__, "geometry": args.geometry, "frames": args.frames, "topology": args.topology or None,
          "devices": args.devices, "batch": args.batch, "text": args.text, "dtype": args.dtype,
          "param_dtype": args.param_dtype, "host": platform.processor() or platform.machine()}
  with open(os.path.join(args.out, name + ".json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  with open(os.path.join(args.out, name + ".md"), "w") as f:
    f.write(f"`python benchmarks/aot_memory.py {' '.join(argv or sys.argv[1:])}` ({json.dumps(meta)})\n\n```\n"
            + HEADER + "\n" + "\n".join(format_row(r) for r in rows) + "\n```\n")
  return rows


if __name__ == "__main__":
  main()
