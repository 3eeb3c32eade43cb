"""Real benchmarks: declarative task definitions, local loaders, generation and scoring.

    from vtr_jax import chat, tasks
    cfg, params, tok = vtr_jax.load(ckpt)
    preds, scores = tasks.run_task(vtr_jax.VLM(cfg), params, tok, "pope", "/data/POPE",
                                   reduction="visionzip:keep=64", template=chat.load(ckpt))

Registered tasks (`known()`): pope, gqa, textvqa, vqav2, vizwiz_vqa, mme, scienceqa_img, mmbench,
seedbench (single-image tasks, run end to end) and videomme, mvbench (defined; running them raises
`UnsupportedInputError` until the model takes video). Adding a task is one `register(Task(...))`.
"""

from vtr_jax.tasks import benchmarks  # noqa: F401  (registers the tasks)
from vtr_jax.tasks.base import Task, UnknownTaskError, UnsupportedInputError, get, known, register
from vtr_jax.tasks.generate import answer, render, run_task, truncate
from vtr_jax.tasks.loading import TaskData, image_of, load

__all__ = ["Task", "TaskData", "UnknownTaskError", "UnsupportedInputError", "answer", "get", "image_of", "known",
           "load", "register", "render", "run_task", "truncate"]
