"""The router-training loop: `train_router(config, workdir)`.

The model (and VAE) parameters are closed-over constants of the jitted step;
optax only ever sees the router `prob` (rows, 2*blocks). The batch is split
over a 1-D `data` mesh of all local devices, the rest replicated.

Two objectives, by `model.family` (see `l2c_jax.training.losses`):
- "dit": DDIM, a "dit-ddim" router with one row per DDIM step; the
  parameters are clamped to [-5, 5] after each AdamW step as in the
  original DiT script (`train.clamp`, default 5.0).
- "uvit": DPM-Solver-2, a "uvit-dpm2" router with NFE rows (the released
  dpm20 / dpm50 layout) of which rows 1..NFE//2-1 train; the original U-ViT
  script does not clamp (its released routers reach |prob| ~ 18), so the
  U-ViT configs set `train.clamp=None`.

Checkpoints (orbax CheckpointManager in WORKDIR/checkpoints) hold the router,
the optimizer state, the step and the data position; a restarted run resumes
from the latest one. Every random draw of step s comes from
fold_in(seed, s), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2c_jax.errors import ConfigError, L2CError

log = logging.getLogger(__name__)


class TrainingDiverged(L2CError):
    """The loss or the router became NaN or infinite."""


def _load_vae(config):
    vc = config.get("vae")
    if vc is None or not vc.get("checkpoint"):
        return None
    from l2c_jax.vae import load_vae

    return load_vae(vc.checkpoint)


def make_mesh():
    """The training mesh: `l2c_jax.parallel`'s `data` mesh over every device."""
    from l2c_jax import parallel

    return parallel.make_mesh()


def build_step(model, vae, config, diffusion, tx):
    """The jitted training step (state, batch, params) -> (state, metrics).

    `diffusion`: the DiT's `GaussianDiffusion` (respaced to the DDIM steps),
    or for a U-ViT the `UViTLossSchedule` of its DPM-Solver-2 steps.
    """
    from l2c_jax.training.losses import dit_random_batch, dit_router_loss, uvit_random_batch, uvit_router_loss

    tc = config.train
    scale = float(config.vae.get("scale", 0.18215)) if vae is not None else 1.0
    base_key = jax.random.key(config.seed)
    ste = tc.get("ste_threshold")
    dropout = float(tc.get("label_dropout", 0.1))
    if model.family == "dit":
        loss_fn = functools.partial(dit_router_loss, model=model, diffusion=diffusion, l1_weight=float(tc.l1),
                                    ste_threshold=ste)

        def draw(key, x0, y):
            return dit_random_batch(key, x0, y, steps=diffusion.num_timesteps, null_class=model.config.null_class,
                                    label_dropout=dropout)
    elif model.family == "uvit":
        loss_fn = functools.partial(uvit_router_loss, model=model, tables=diffusion, l1_weight=float(tc.l1),
                                    ste_threshold=ste)
        conditional = model.config.conditional

        def draw(key, x0, y):
            return uvit_random_batch(key, x0, y if conditional else None, steps=diffusion.num_steps,
                                     null_class=model.config.null_class, label_dropout=dropout)
    else:
        raise ConfigError(f"router training for the {model.family} family is not wired in yet")
    clamp = tc.get("clamp", 5.0)
    clamp = None if clamp is None else float(clamp)

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
        x0 = latents(batch, k_post)
        b = draw(k_draw, x0, batch["y"])
        (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(state["prob"], params, b)
        updates, opt_state = tx.update(grad, state["opt_state"], state["prob"])
        prob = optax.apply_updates(state["prob"], updates)
        if clamp is not None:
            prob = jnp.clip(prob, -clamp, clamp)
        metrics = dict(loss=loss, data_loss=aux["data_loss"], l1_term=float(tc.l1) * aux["l1"])
        return dict(prob=prob, opt_state=opt_state, step=state["step"] + 1), metrics

    return jax.jit(step, donate_argnums=(0,))


def training_setup(model, config):
    """(objective tables for `build_step`, router kind, router rows, heat-map rows) for the model's family."""
    from l2c_jax.router import Router

    steps = int(config.sampler.steps)
    if model.family == "dit":
        from l2c_jax.diffusion import create_diffusion

        if steps % 2:
            raise ConfigError(f"sampler.steps must be even for DiT caching (full and cache steps alternate), "
                              f"got {steps}")
        diffusion = create_diffusion(str(steps), learn_sigma=model.config.learn_sigma)
        return diffusion, "dit-ddim", steps, np.arange(steps - 2, -1, -2)  # cache steps' rows, sampling order
    if model.family == "uvit":
        from l2c_jax.training.losses import UViTLossSchedule

        name = config.sampler.get("name", "dpm_solver2")
        if name != "dpm_solver2":
            raise ConfigError(f"U-ViT router training runs singlestep DPM-Solver-2 as the original does; "
                              f"sampler.name must be 'dpm_solver2', got {name!r}")
        tables = UViTLossSchedule.create(steps, skip_type=config.sampler.get("skip_type", "time_uniform"))
        rows = Router(np.zeros((steps, model.num_units), np.float32), "uvit-dpm2").cache_rows()
        return tables, "uvit-dpm2", steps, np.asarray(rows)  # NFE rows; rows 1..NFE//2-1 train
    raise ConfigError(f"router training for the {model.family} family is not wired in yet")


def router_heatmap(prob: np.ndarray, rows: np.ndarray, upscale: int = 8) -> np.ndarray:
    """(cache steps x sub-layers) of sigmoid(prob) as an RGB uint8 image: bright = computed."""
    beta = 1.0 / (1.0 + np.exp(-np.asarray(prob, np.float64)[rows]))
    img = (np.clip(beta, 0, 1) * 255).astype(np.uint8)
    img = np.repeat(np.repeat(img, upscale, 0), upscale, 1)
    return np.stack([img] * 3, -1)


def train_router(config, workdir: str, report=print) -> dict:
    """Trains (or resumes training) a router; returns final metrics and paths."""
    import orbax.checkpoint as ocp
    from clu import metric_writers, periodic_actions

    from l2c_jax import parallel
    from l2c_jax.images import save_png
    from l2c_jax.router import Router, save_router
    from l2c_jax.training.data import Batches, make_source

    tc = config.train
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    from l2c_jax.model import model_from_config

    model = model_from_config(config.model)
    vae = _load_vae(config)
    diffusion, kind, steps, cache_rows = training_setup(model, config)
    num_units = model.num_units

    mesh = make_mesh()
    n_dev = mesh.devices.size
    if tc.batch_size % n_dev:
        raise ConfigError(f"train.batch_size {tc.batch_size} is not divisible by {n_dev} devices")
    data_sharding = parallel.batch_sharded(mesh)

    source = make_source(config.data, int(config.data.image_size))
    batches = Batches(source, int(tc.batch_size), seed=int(config.seed), flip=config.data.get("flip", True))

    tx = optax.adamw(float(tc.lr), b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    prob0 = jax.random.normal(jax.random.key(config.seed + 1), (steps, num_units), jnp.float32)  # torch.randn init
    state = dict(prob=prob0, opt_state=tx.init(prob0), step=jnp.int32(0))

    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=int(tc.get("keep_checkpoints", 3)), create=True))
    latest = mngr.latest_step()
    if latest is not None:
        restored = mngr.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)),
            data=ocp.args.JsonRestore()))
        state = restored.state
        batches.restore(restored.data)
        report(f"resumed from {ckpt_dir} at step {int(state['step'])}")
    state = parallel.place(state, mesh)
    params = model.on_devices(mesh).params  # loaded models are placed already: no copy
    if vae is not None:
        vae.params = parallel.place(vae.params, mesh)

    step_fn = build_step(model, vae, config, diffusion, tx)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    total = int(tc.steps)
    progress = periodic_actions.ReportProgress(num_train_steps=total, writer=writer)
    thr = float(config.router.get("threshold", 0.5))
    log_every, ckpt_every = int(tc.log_every), int(tc.checkpoint_every)

    def save(step_state, data_state):
        prob = np.asarray(step_state["prob"])
        if not np.all(np.isfinite(prob)):
            raise TrainingDiverged("router parameters are not finite; the last good checkpoint is kept")
        mngr.save(int(step_state["step"]), args=ocp.args.Composite(
            state=ocp.args.StandardSave(step_state), data=ocp.args.JsonSave(data_state)), force=True)

    interrupted = []
    prev_handler = signal.signal(signal.SIGTERM, lambda *_: interrupted.append(True))
    acc, t_last, n_acc = None, time.perf_counter(), 0
    last, history = {}, []
    try:
        step = int(state["step"])
        while step < total and not interrupted:
            batch = next(batches)
            batch = jax.tree.map(lambda a: jax.make_array_from_process_local_data(data_sharding, a), batch)
            state, metrics = step_fn(state, batch, params)
            step += 1
            acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
            n_acc += 1
            progress(step)
            if step % log_every == 0 or step == total:
                m = {k: float(v) / n_acc for k, v in jax.device_get(acc).items()}
                if not all(np.isfinite(v) for v in m.values()):
                    raise TrainingDiverged(
                        f"loss became non-finite between steps {step - n_acc + 1} and {step} "
                        f"(lr {tc.lr}); the last good checkpoint (step {mngr.latest_step()}) is kept")
                prob = np.asarray(state["prob"])
                router = Router(prob, kind, threshold=thr)
                computed, tot = router.counts(thr)
                m["computed_share"] = computed / tot
                m["steps_per_sec"] = n_acc / (time.perf_counter() - t_last)
                writer.write_scalars(step, m)
                heat = router_heatmap(prob, cache_rows)
                writer.write_images(step, {"router": heat[None].astype(np.float32) / 255.0})
                save_png(os.path.join(workdir, "router_heatmap.png"), heat)
                last = dict(m, step=step)
                history.append(last)
                acc, n_acc, t_last = None, 0, time.perf_counter()
            if step % ckpt_every == 0 or step == total:
                save(state, batches.state())
    except KeyboardInterrupt:
        interrupted.append(True)
    finally:
        signal.signal(signal.SIGTERM, prev_handler)
    if interrupted:
        # An interruption keeps what was done: checkpoint where we stopped (if sane).
        if acc is None or all(np.isfinite(float(v)) for v in jax.device_get(acc).values()):
            save(state, batches.state())
            mngr.wait_until_finished()
            report(f"interrupted at step {int(state['step'])}; checkpoint saved, rerun the same command to resume")
        mngr.close()
        writer.close()
        raise KeyboardInterrupt
    mngr.wait_until_finished()
    mngr.close()
    writer.flush()
    writer.close()

    router = Router(np.asarray(state["prob"]), kind, threshold=thr, source=f"train_router step {int(state['step'])}")
    path = save_router(router, os.path.join(workdir, "router.safetensors"))
    report(f"wrote {path}: {router.summary(thr)}")
    return dict(last, router=path, history=history)
