"""Training a class-conditional DiT or U-ViT from scratch (scripts/train_dit.py).

`config.model.family` picks the recipe. DiT's: the simple epsilon MSE plus
the variational-bound term for the learned variance, adaLN-Zero
initialisation. U-ViT's: the epsilon MSE over the discrete VP schedule its
samplers use (`l2c_jax.training.uvit_objective`). Both: AdamW (no weight
decay), label dropout 0.1 for classifier-free guidance, and an EMA of the
weights that is what gets saved and sampled. The loop, checkpoints (resumable from WORKDIR/checkpoints),
interruption and divergence handling are router training's
(`l2c_jax.training.loop`); the final EMA model is written to WORKDIR/model
(a directory `load_model` reads).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax

from l2c_jax import distributed, parallel
from l2c_jax.diffusion import DiscreteVPSchedule, create_diffusion
from l2c_jax.errors import ConfigError
from l2c_jax.model import Model, architecture
from l2c_jax.training.data import Batches, make_source
from l2c_jax.training.dit_objective import dit_training_loss
from l2c_jax.training.uvit_objective import uvit_training_loss
from l2c_jax.training.loop import train_loop, training_workdir


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
    """Trains (or resumes training) a DiT or U-ViT (`config.model.family`) from scratch; returns the log
    history and the model path. The workdir is checked before any work and locked while the job runs
    (`training_workdir`)."""
    with training_workdir(config, workdir, "train_dit"):
        return _train_dit(config, workdir, distributed.main_only(report))


def _train_dit(config, workdir: str, report) -> dict:
    tc = config.train
    family = config.model.get("family") or "dit"
    if family not in ("dit", "uvit"):
        raise ConfigError(f"config.model.family: train_dit trains dit or uvit models, not {family!r}")
    arch = architecture(config.model)  # the config schema's rules: l2c_jax/configs/common.py
    model = Model.random(family, arch, int(config.seed))
    if family == "dit":
        model.params = dit_initialization(model.params, jax.random.key(int(config.seed) + 3))
        diffusion = create_diffusion("", learn_sigma=arch.learn_sigma)  # all 1000 steps, as DiT trains

        def objective(p, batch, key):
            return dit_training_loss(p, lambda q, x, t, y: model.apply(q, x, t, y)[0], diffusion, batch["images"],
                                     batch["y"], key, null_class=arch.null_class,
                                     label_dropout=float(tc.label_dropout))
    else:
        vp = DiscreteVPSchedule.stable_diffusion()  # what UViTSampler samples with

        def objective(p, batch, key):
            y = batch["y"] if arch.conditional else None
            return uvit_training_loss(p, lambda q, x, t, yy: model.apply(q, x, t, yy)[0], vp, batch["images"], y,
                                      key, null_class=arch.null_class, label_dropout=float(tc.label_dropout))
    source = make_source(config.data, int(config.data.image_size))
    batches = Batches(source, int(tc.batch_size), seed=int(config.seed), flip=bool(config.data.get("flip", False)),
                      process_index=jax.process_index(), process_count=jax.process_count())
    mesh = parallel.make_mesh()

    tx = optax.chain(optax.clip_by_global_norm(float(tc.get("grad_clip", 1e9))),
                     optax.adamw(float(tc.lr), weight_decay=float(tc.get("weight_decay", 0.0))))

    def init_state():
        # ema starts as a copy: donation forbids two leaves sharing one buffer.
        return dict(params=model.params, ema=jax.tree.map(jnp.copy, model.params), opt_state=tx.init(model.params),
                    step=jnp.int32(0))

    base_key = jax.random.key(int(config.seed) + 7)
    decay = float(tc.ema_decay)

    def step_fn(state, batch):
        key = jax.random.fold_in(base_key, state["step"])

        (loss, aux), grads = jax.value_and_grad(lambda p: objective(p, batch, key), has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
        return dict(params=params, ema=ema, opt_state=opt_state, step=state["step"] + 1), dict(loss=loss, **aux)

    def on_log(step, state, m, writer):
        parts = f"mse {m['mse']:.4f}" + (f", vb {m['vb']:.4f}" if "vb" in m else "")
        report(f"step {step}: loss {m['loss']:.4f} ({parts}), {m['steps_per_sec']:.1f} steps/s")

    state, history = train_loop(
        init_state, jax.jit(step_fn, donate_argnums=(0,)), batches, mesh, workdir=workdir, total_steps=int(tc.steps),
        log_every=int(tc.log_every), checkpoint_every=int(tc.checkpoint_every),
        keep_checkpoints=int(tc.get("keep_checkpoints", 2)), on_log=on_log, hint=f"lr {tc.lr}", report=report)

    out = os.path.join(workdir, "model")
    step = int(state["step"])
    Model(family, arch, jax.device_get(state["ema"])).save(out, overwrite=True, source=f"train_dit step {step} (EMA)")
    report(f"wrote {out}")
    return dict(history=history, model=out)
