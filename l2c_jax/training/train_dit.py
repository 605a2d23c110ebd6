"""Training a class-conditional DiT from scratch (scripts/train_dit.py).

DiT's recipe: the simple epsilon MSE plus the variational-bound term for the
learned variance, AdamW (no weight decay), label dropout 0.1 for
classifier-free guidance, and an EMA of the weights that is what gets saved
and sampled. Resumable from WORKDIR/checkpoints like router training; the
final EMA model is written to WORKDIR/model (a directory `load_model` reads).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2c_jax.errors import ConfigError


def dit_initialization(params, key):
    """The original's initialisation where it matters for training from scratch: adaLN-Zero
    (modulations and the output layer start at zero, so each block starts as the identity)
    and N(0, 0.02) label and timestep embeddings. Other layers keep Flax's defaults."""
    params = jax.tree.map(lambda a: a, params)  # a mutable copy of the nested dicts
    k_emb, k_t0, k_t2 = jax.random.split(key, 3)
    for name, sub in params.items():
        if name.startswith("blocks_") or name == "final_layer":
            sub["adaLN_modulation_1"] = jax.tree.map(jnp.zeros_like, sub["adaLN_modulation_1"])
    params["final_layer"]["linear"] = jax.tree.map(jnp.zeros_like, params["final_layer"]["linear"])
    table = params["y_embedder"]["embedding_table"]["embedding"]
    params["y_embedder"]["embedding_table"]["embedding"] = 0.02 * jax.random.normal(k_emb, table.shape)
    for k, layer in ((k_t0, "mlp_0"), (k_t2, "mlp_2")):
        w = params["t_embedder"][layer]["kernel"]
        params["t_embedder"][layer]["kernel"] = 0.02 * jax.random.normal(k, w.shape)
    return params


def train_dit(config, workdir: str, report=print) -> dict:
    import orbax.checkpoint as ocp
    from clu import metric_writers, periodic_actions

    from l2c_jax import parallel
    from l2c_jax.diffusion import create_diffusion
    from l2c_jax.model import Model
    from l2c_jax.models.dit import DiTConfig
    from l2c_jax.training.data import Batches, make_source
    from l2c_jax.training.dit_objective import dit_training_loss
    from l2c_jax.training.trainer import TrainingDiverged, make_mesh

    tc = config.train
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    arch = DiTConfig(**config.model.arch.to_dict())
    model = Model.random("dit", arch, int(config.seed))
    model.params = dit_initialization(model.params, jax.random.key(int(config.seed) + 3))
    diffusion = create_diffusion("", learn_sigma=arch.learn_sigma)  # all 1000 steps, as DiT trains
    source = make_source(config.data, int(config.data.image_size))
    batches = Batches(source, int(tc.batch_size), seed=int(config.seed), flip=bool(config.data.get("flip", False)))

    mesh = make_mesh()
    if tc.batch_size % mesh.devices.size:
        raise ConfigError(f"train.batch_size {tc.batch_size} is not divisible by {mesh.devices.size} devices")
    data_sharding = parallel.batch_sharded(mesh)

    tx = optax.chain(optax.clip_by_global_norm(float(tc.get("grad_clip", 1e9))),
                     optax.adamw(float(tc.lr), weight_decay=float(tc.get("weight_decay", 0.0))))
    # ema starts as a copy: donation forbids two leaves sharing one buffer.
    state = dict(params=model.params, ema=jax.tree.map(jnp.copy, model.params), opt_state=tx.init(model.params),
                 step=jnp.int32(0))
    mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    if mngr.latest_step() is not None:
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)),
            data=ocp.args.JsonRestore()))
        state = restored.state
        batches.restore(restored.data)
        report(f"resumed at step {int(state['step'])}")
    state = parallel.place(state, mesh)
    base_key = jax.random.key(int(config.seed) + 7)
    decay = float(tc.ema_decay)

    def step_fn(state, batch):
        key = jax.random.fold_in(base_key, state["step"])

        def loss_fn(p):
            return dit_training_loss(p, lambda q, x, t, y: model.apply(q, x, t, y)[0], diffusion, batch["images"],
                                     batch["y"], key, null_class=arch.null_class,
                                     label_dropout=float(tc.label_dropout))

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
        return dict(params=params, ema=ema, opt_state=opt_state, step=state["step"] + 1), dict(loss=loss, **aux)

    step_fn = jax.jit(step_fn, donate_argnums=(0,))
    writer = metric_writers.create_default_writer(workdir)
    total = int(tc.steps)
    progress = periodic_actions.ReportProgress(num_train_steps=total, writer=writer)
    acc, n, t0 = None, 0, time.perf_counter()
    step = int(state["step"])
    history = []
    while step < total:
        batch = jax.tree.map(lambda a: jax.make_array_from_process_local_data(data_sharding, a), next(batches))
        state, m = step_fn(state, batch)
        step += 1
        acc = m if acc is None else jax.tree.map(jnp.add, acc, m)
        n += 1
        progress(step)
        if step % int(tc.log_every) == 0 or step == total:
            mm = {k: float(v) / n for k, v in jax.device_get(acc).items()}
            if not all(np.isfinite(v) for v in mm.values()):
                raise TrainingDiverged(f"loss became non-finite before step {step}; last checkpoint "
                                       f"(step {mngr.latest_step()}) kept")
            mm["steps_per_sec"] = n / (time.perf_counter() - t0)
            writer.write_scalars(step, mm)
            history.append(dict(mm, step=step))
            report(f"step {step}: loss {mm['loss']:.4f} (mse {mm['mse']:.4f}, vb {mm['vb']:.4f}), "
                   f"{mm['steps_per_sec']:.1f} steps/s")
            acc, n, t0 = None, 0, time.perf_counter()
        if step % int(tc.checkpoint_every) == 0 or step == total:
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(batches.state())), force=True)
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    out = os.path.join(workdir, "model")
    Model("dit", arch, jax.device_get(state["ema"])).save(out, overwrite=True,
                                                            source=f"train_dit step {step} (EMA)")
    report(f"wrote {out}")
    return dict(history=history, model=out)
