"""The router-training job: `train_router(config, workdir)`.

The model (and VAE) parameters are closed-over constants of the jitted step;
optax only ever sees the router: `prob` (rows, 2*blocks), and with
`router.learn_forecast` also its forecast coefficients `coefs` (rows, 2*blocks,
2), started at Taylor's own (`l2c_jax.sampling.forecast`). The batch is split
over a 1-D `data` mesh of all local devices, the rest replicated.

The objective comes from the model's family (`l2c_jax.training.objectives`):
- "dit": DDIM, a "dit-ddim" router with one row per DDIM step; the
  parameters are clamped to [-5, 5] after each AdamW step as in the
  original DiT script (`train.clamp`, default 5.0).
- "uvit": DPM-Solver-2, a "uvit-dpm2" router with NFE rows (the released
  dpm20 / dpm50 layout) of which rows 1..NFE//2-1 train; the original U-ViT
  script does not clamp (its released routers reach |prob| ~ 18), so the
  U-ViT configs set `train.clamp=None`.

With `data.trajectories` the router trains without images: the model's own
full-sampler trajectories are recorded first (`l2c_jax.training.trajectories`)
and every loss starts from a recorded state instead of a noised image.

The loop (`l2c_jax.training.loop.train_loop`) checkpoints the router, the
optimizer state, the step and the data position in WORKDIR/checkpoints and
resumes from the latest; every random draw of step s comes from
fold_in(seed, s), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2c_jax import distributed, parallel
from l2c_jax.errors import finite_number, whole_number
from l2c_jax.images import save_png
from l2c_jax.model import model_from_config
from l2c_jax.router import save_router
from l2c_jax.training.data import Batches, make_source
from l2c_jax.training.loop import TrainingDiverged, train_loop, training_workdir
from l2c_jax.training.objectives import RouterObjective, router_objective
from l2c_jax.training.trajectories import record_trajectories, trajectories_dir
from l2c_jax.vae import load_vae

__all__ = ["TrainingDiverged", "build_step", "make_mesh", "router_heatmap", "train_router"]


def _load_vae(config):
    vc = config.get("vae")
    if vc is None or not vc.get("checkpoint"):
        return None
    return load_vae(vc.checkpoint)


def make_mesh():
    """The training mesh: `l2c_jax.parallel`'s `data` mesh over every device."""
    return parallel.make_mesh()


def build_step(objective: RouterObjective, vae, config, tx):
    """The jitted training step (state, batch, params) -> (state, metrics) of `objective`."""
    tc = config.train
    scale = float(config.vae.get("scale", 0.18215)) if vae is not None else 1.0
    base_key = jax.random.key(config.seed)
    clamp = tc.get("clamp", 5.0)
    clamp = None if clamp is None else float(clamp)
    l1_weight = float(tc.l1)

    def latents(batch, key):
        if "moments" in batch:
            mean, logvar = jnp.split(batch["moments"], 2, axis=-1)
        elif vae is not None:
            mean, logvar = vae.apply_encode(vae.params, batch["images"])
        else:  # a pixel-space model trains on the images themselves
            return batch["images"]
        logvar = jnp.clip(logvar, -30.0, 20.0)  # as both originals' posterior sampling
        return (mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)) * scale

    def step(state, batch, params):
        key = jax.random.fold_in(base_key, state["step"])
        k_post, k_draw = jax.random.split(key)
        if "states" in batch:  # image-free: the losses start from recorded sampler states (x0: shapes only)
            b = dict(objective.draw(k_draw, batch["states"][:, 0], batch["y"]), states=batch["states"])
        else:
            b = objective.draw(k_draw, latents(batch, k_post), batch["y"])
        # The router is what the optimizer sees: prob, and with learned forecasts their coefficients too.
        router = _router_tree({k: state[k] for k in ROUTER_KEYS if k in state})

        def loss_of(r):
            if isinstance(r, dict):
                return objective.loss(r["prob"], params, b, coefs=r["coefs"])
            return objective.loss(r, params, b)

        (loss, aux), grad = jax.value_and_grad(loss_of, has_aux=True)(router)
        updates, opt_state = tx.update(grad, state["opt_state"], router)
        new = optax.apply_updates(router, updates)
        new = new if isinstance(new, dict) else {"prob": new}
        if clamp is not None:
            new["prob"] = jnp.clip(new["prob"], -clamp, clamp)
        metrics = dict(loss=loss, data_loss=aux["data_loss"], l1_term=l1_weight * aux["l1"])
        return dict(new, opt_state=opt_state, step=state["step"] + 1), metrics

    return jax.jit(step, donate_argnums=(0,))


ROUTER_KEYS = ("prob", "coefs")


def _router_tree(trained: dict):
    """What optax sees: prob alone (as every router trained before learned forecasts: their optimizer state
    resumes unchanged), or {"prob", "coefs"}."""
    return trained if "coefs" in trained else trained["prob"]


def router_heatmap(prob: np.ndarray, rows: np.ndarray, upscale: int = 8) -> np.ndarray:
    """(cache steps x sub-layers) of sigmoid(prob) as an RGB uint8 image: bright = computed."""
    beta = 1.0 / (1.0 + np.exp(-np.asarray(prob, np.float64)[rows]))
    img = (np.clip(beta, 0, 1) * 255).astype(np.uint8)
    img = np.repeat(np.repeat(img, upscale, 0), upscale, 1)
    return np.stack([img] * 3, -1)


def check_train_config(tc) -> None:
    """The training knobs, checked before any work: a count below 1 or a non-finite rate failed late (a
    NumPy or division error after the model loaded) or, for 0 steps, wrote an untrained router."""
    for key in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        whole_number(f"train.{key}", tc.get(key, 1), low=1)
    finite_number("train.lr", tc.get("lr"), low=0.0, low_open=True)
    finite_number("train.l1", tc.get("l1"), low=0.0)
    if tc.get("clamp") is not None:
        finite_number("train.clamp", tc.clamp, low=0.0, low_open=True)


def train_router(config, workdir: str, report=print) -> dict:
    """Trains (or resumes training) a router; returns final metrics and paths.

    The knobs and the workdir are checked before any work (`check_train_config`,
    `l2c_jax.training.loop.training_workdir`), and the workdir is locked while the job runs.
    """
    check_train_config(config.train)
    with training_workdir(config, workdir, "train_router"):
        return _train_router(config, workdir, distributed.main_only(report))


def _train_router(config, workdir: str, report) -> dict:
    tc = config.train
    model = model_from_config(config.model)
    vae = _load_vae(config)
    objective = router_objective(model, config)
    mesh = make_mesh()
    if vae is not None:
        vae.params = parallel.place(vae.params, mesh)

    trajectories = None
    if config.data.get("trajectories"):  # image-free: the model's own trajectories, recorded once
        trajectories = record_trajectories(config, trajectories_dir(config, workdir), model, report)
    source = make_source(config.data, int(config.data.image_size), trajectories)
    batches = Batches(source, int(tc.batch_size), seed=int(config.seed), flip=config.data.get("flip", True),
                      process_index=jax.process_index(), process_count=jax.process_count())

    tx = optax.adamw(float(tc.lr), b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)

    def init_state():
        prob0 = jax.random.normal(jax.random.key(config.seed + 1), (objective.rows, model.num_units),
                                  jnp.float32)  # torch.randn init
        trained = {"prob": prob0}
        if objective.initial_coefs is not None:  # learned forecasts start as Taylor's
            trained["coefs"] = jnp.asarray(objective.initial_coefs)
        return dict(trained, opt_state=tx.init(_router_tree(trained)), step=jnp.int32(0))

    params = model.on_devices(mesh).params  # loaded models are placed already: no copy
    step_fn = build_step(objective, vae, config, tx)
    thr = float(config.router.get("threshold", 0.5))

    def on_log(step, state, metrics, writer):
        # What the router looks like now: its computed share and a heat map (TensorBoard and a PNG).
        prob = np.asarray(state["prob"])
        computed, total = objective.router(prob, threshold=thr).counts(thr)
        heat = router_heatmap(prob, objective.heat_rows)
        writer.write_images(step, {"router": heat[None].astype(np.float32) / 255.0})
        if distributed.is_main():
            save_png(os.path.join(workdir, "router_heatmap.png"), heat)
        return {"computed_share": computed / total}

    state, history = train_loop(
        init_state, lambda s, b: step_fn(s, b, params), batches, mesh, workdir=workdir, total_steps=int(tc.steps),
        log_every=int(tc.log_every), checkpoint_every=int(tc.checkpoint_every),
        keep_checkpoints=int(tc.get("keep_checkpoints", 3)), on_log=on_log, hint=f"lr {tc.lr}", report=report)

    router = objective.router(state["prob"], threshold=thr, source=f"train_router step {int(state['step'])}",
                              coefs=state.get("coefs"))
    path = os.path.join(workdir, "router.safetensors")
    if distributed.is_main():
        save_router(router, path)
    report(f"wrote {path}: {router.summary(thr)}")
    last = history[-1] if history else {}
    return dict(last, router=path, history=history)
