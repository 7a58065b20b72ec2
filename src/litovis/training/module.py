"""`OvisFineTuner`: the LightningModule that fine-tunes Ovis2.5 with LoRA (or fully).

Notable:
- The model is built in `configure_model` (idempotent; `litovis.training.finetune_model`), inside
  Lightning's device context, so the bf16 base lands directly on the GPU and PiSSA's SVD runs
  there; under Lightning's `ModelParallelStrategy` it is sharded with FSDP2 before any weight exists.
- PiSSA changes the frozen base weights. A fresh run initialises it when training starts, after any
  checkpoint restore (whatever the strategy's restore order), with rank 0's factors on every rank;
  a resumed run rebuilds the residual from the A0/B0 stored in its checkpoint
  (`on_load_checkpoint`), so both end with identical bits.
- Checkpoints hold trainable weights only (`state_dict` itself is filtered, so sharded strategies
  neither gather nor expect the frozen base), optimizer/loop/data state, every rank's RNG state and
  a human-readable `litovis` metadata block; every trainable parameter must be found on load.
- The loss is chunked CE or DFT on hidden states (no full logits), computed inside the model's
  forward (where a sharded output weight is whole), normalised per target token over the whole
  optimizer step (all micro-batches, all ranks), the same rule for CE and DFT.
- Distributed: when a vision part trains, a text-only batch still touches it with zero
  contribution, so DDP needs no `find_unused_parameters`; under FSDP it always does (every rank
  must run the same sharded modules).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor

from litovis.training.config import (
    Finetune,
    LossConfig,
    MemoryConfig,
    ModelSource,
    OptimizerConfig,
    PredictConfig,
    Trainable,
)
from litovis.training.distributed_pissa import pissa_initialize_on_ranks, restore_pissa_residual_on_ranks
from litovis.training.finetune_model import build_finetune_model
from litovis.training.lora import LoRAConfig
from litovis.training.losses import shift_targets, token_loss
from litovis.training.lr_schedule import build_lr_scheduler
from litovis.training.rng_state import gather_rng_states, rank_rng_state, restore_rng_state
from litovis.training.sharding import total_norm
from litovis.training.token_stats import TokenStats

# Validation/test metrics are reduced across ranks before they are logged (`TokenStats.reduce`),
# so Lightning's advice to reduce epoch-level metrics with `sync_dist` does not apply to them.
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self\.log\('(val|test)", category=PossibleUserWarning
)


class OvisFineTuner(L.LightningModule):
    """Ovis2.5 + LoRA (or full fine-tuning of the LLM) trained with chunked CE/DFT.

    Args:
        source: base model and tokenizer location (or a random-init preset).
        finetune: `lora` (adapters on the LLM's linear layers) or `full` (every LLM weight trains).
        lora: adapter settings (used with `finetune: lora`).
        trainable: which vision parts train besides the LLM.
        optimizer: AdamW and LR schedule.
        loss: chunked loss settings.
        memory: activation checkpointing and compilation.
        predict: decoding settings for `litovis predict`.
        task_names: task vocabulary for per-task logging, in the order of the batches' task indices.
            Taken from the data module when it has one (giving a different list is an error); give
            it only to use the module without a data module.
    """

    def __init__(
        self,
        source: ModelSource,
        finetune: Finetune = "lora",
        lora: LoRAConfig | None = None,
        trainable: Trainable | None = None,
        optimizer: OptimizerConfig | None = None,
        loss: LossConfig | None = None,
        memory: MemoryConfig | None = None,
        predict: PredictConfig | None = None,
        task_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        if finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
        self.source = source
        self.finetune = finetune
        self.lora = lora or LoRAConfig()
        self.trainable = trainable or Trainable()
        self.optim = optimizer or OptimizerConfig()
        self.loss_cfg = loss or LossConfig()
        self.memory = memory or MemoryConfig()
        self.predict_cfg = predict or PredictConfig()
        self._predictor = None
        self._given_task_names = list(task_names or [])
        self.task_names = list(self._given_task_names)
        self.model: torch.nn.Module | None = None
        self.loss_kind = "ce"
        self.strict_loading = False  # only trainable weights are saved; checked in on_load_checkpoint
        self._pissa_initial: dict[str, Tensor] | None = None
        self._pissa_pending = False
        self._train_stats: TokenStats | None = None
        self._eval_stats: TokenStats | None = None  # validation or test, one at a time
        self._ce_ema: float | None = None
        self._logged_step = -1
        self._rng_to_restore: dict[str, Any] | None = None

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self._trainer is not None and isinstance(self.trainer.strategy, L.pytorch.strategies.FSDPStrategy):
            raise ValueError("strategy `fsdp` (FSDP1) is not supported: use lightning.pytorch.strategies."
                             "ModelParallelStrategy, which litovis shards with FSDP2 (docs/multi_gpu.md)")
        sharding = None
        if self._device_mesh is not None:  # set by Lightning's ModelParallelStrategy: shard with FSDP2
            sharding = (self._device_mesh, self.trainer.precision, self.trainer.strategy.root_device)
        self.model = build_finetune_model(self.source, self.finetune, self.lora, self.trainable, self.memory, sharding)
        self._pissa_pending = self.source.adapter is None and self.finetune == "lora" and self.lora.is_pissa

    @classmethod
    def for_inference(cls, checkpoint: dict[str, Any], base: str | None = None) -> OvisFineTuner:
        """The trained module of a litovis checkpoint (a dict read with `torch.load`), in eval mode.

        The module is rebuilt from the checkpoint's `litovis` block and restored the way Lightning
        restores it (`on_load_checkpoint`: key check and PiSSA residual; then `load_state_dict`).
        `base` replaces the base model directory the run was trained on (same weights elsewhere).

        Raises:
            KeyError: no `litovis` block, or the stored weight names do not match the rebuilt module.
            RuntimeError: a stored weight's shape differs from the rebuilt module's.
        """
        meta = checkpoint.get("litovis")
        if not isinstance(meta, dict) or "state_dict" not in checkpoint:
            raise KeyError("no `litovis` block or `state_dict`: not a checkpoint written by OvisFineTuner")
        source = ModelSource(**meta["source"])
        if base is not None:
            source = replace(source, checkpoint=str(base), preset=None)
        module = cls(
            source,
            finetune=meta["finetune"],
            lora=LoRAConfig(**meta["lora"]) if meta.get("lora") else None,
            trainable=Trainable(**meta["trainable"]),
            memory=MemoryConfig(gradient_checkpointing=False),  # no backward at inference
        )
        module.configure_model()
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=False)
        return module.eval()

    @property
    def ovis(self) -> torch.nn.Module:
        """The underlying `Ovis2_5` (without the PEFT wrapper)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def setup(self, stage: str) -> None:
        # The batches index tasks in the data module's vocabulary: per-task metrics must use it.
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        names = list(getattr(datamodule, "task_names", None) or [])
        if not names:
            return
        if self._given_task_names and self._given_task_names != names:
            raise ValueError(
                f"model task_names {self._given_task_names} differ from the data module's task vocabulary "
                f"{names}, which the batches' task indices refer to: leave task_names unset"
            )
        self.task_names = names

    # ------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        if self.source.adapter is not None:
            raise ValueError("model.source.adapter is for predict/validate/test; to continue a run use --ckpt_path")
        opt = self.build_optimizer()
        sched = build_lr_scheduler(opt, self.optim, self.trainer)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def build_optimizer(self) -> torch.optim.AdamW:
        """AdamW over every trainable parameter (fused on CUDA unless configured otherwise).

        `configure_optimizers` adds the LR schedule; benchmarks drive this optimizer directly.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("nothing to train: every parameter is frozen")
        fused = self.optim.fused if self.optim.fused is not None else params[0].is_cuda
        return torch.optim.AdamW(
            params,
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
            eps=self.optim.eps,
            weight_decay=self.optim.weight_decay,
            fused=fused,
        )

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Log the total gradient norm (before clipping) and clip it, from one norm computation.

        Lightning calls this after `on_before_optimizer_step`, every step, clipping or not. It
        clips here rather than in Lightning because its mixed-precision plugin refuses clipping
        with a fused optimizer even under bf16, which has no loss scaling; only fp16's grad
        scaler makes fused clipping unsafe.
        """
        if gradient_clip_val:
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"only norm clipping is supported, got gradient_clip_algorithm={gradient_clip_algorithm!r}")
            if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
                raise ValueError("fp16 loss scaling with gradient clipping is not supported: use bf16-mixed")
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:  # NonFiniteGuard dropped this step's gradients
            return
        norm = total_norm([p.grad for p in params])
        if gradient_clip_val:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
        self.log("train/grad_norm", norm.item(), on_step=True, on_epoch=False, batch_size=1)

    # --------------------------------------------------------------- forward
    def _token_loss(self, batch: Any, kind: str):
        targets = shift_targets(batch.labels, batch.cu_seqlens)

        def head_loss(hidden: Tensor, output_weight: Tensor):
            return token_loss(
                hidden.flatten(0, 1),
                output_weight,
                targets,
                kind=kind,
                chunk_size=self.loss_cfg.chunk_size,
                label_smoothing=self.loss_cfg.label_smoothing if kind == "ce" else 0.0,
            )

        out = self.model(
            input_ids=batch.input_ids,
            pixel_values=batch.pixel_values,
            grid_thws=batch.grid_thws,
            position_ids=batch.position_ids,
            cu_seqlens=batch.cu_seqlens,
            max_seqlen=batch.max_seqlen,
            head_loss=head_loss,  # computed inside forward: see the module doc
        )
        result = out.head_loss
        lengths = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
        token_task = batch.sample_task_index.to(lengths.device).repeat_interleave(lengths.long())
        return result, targets != -100, token_task

    def _stats(self, existing: TokenStats | None) -> TokenStats:
        return existing if existing is not None else TokenStats(max(1, len(self.task_names)), self.device)

    def training_loss(self, batch: Any, step_targets: Tensor, averaged_over: int = 1) -> Tensor:
        """This micro-batch's share of its optimizer step's per-target-token mean loss.

        Returns `loss_sum * averaged_over / step_targets` with the current loss kind (CE or DFT):
        `step_targets` counts the targets of the whole optimizer step (all micro-batches, all
        ranks), and `averaged_over` undoes a framework's own averaging of the returned losses
        (1 when the caller back-propagates each returned loss as it is). Also adds the
        micro-batch's per-token statistics to the running training stats.
        """
        result, mask, token_task = self._token_loss(batch, self.loss_kind)
        scale = averaged_over / step_targets.clamp(min=1)
        per_token = result.dft if self.loss_kind == "dft" else result.ce
        self._train_stats = self._stats(self._train_stats)
        self._train_stats.add(per_token, result.ce, result.dft, result.correct, mask, token_task)
        return result.loss_sum * scale

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        # Per-target-token mean over the whole optimizer step and all ranks; Lightning divides the
        # returned loss by accumulate_grad_batches and DDP averages over ranks: undo both.
        step_targets = torch.as_tensor(float(batch.step_num_targets), device=self.device)
        step_targets = self.trainer.strategy.reduce(step_targets, reduce_op="sum")
        averaged_over = self.trainer.accumulate_grad_batches * self.trainer.world_size
        return self.training_loss(batch, step_targets, averaged_over)

    def on_train_start(self) -> None:
        self._logged_step = self.trainer.global_step
        if self._pissa_pending:  # a fresh run: every strategy has restored (nothing) by now
            self._pissa_initial = pissa_initialize_on_ranks(self.model, self.lora)
            self._pissa_pending = False
        if self._rng_to_restore is not None:  # after Lightning's own start-up, right before step 1
            restore_rng_state(self._rng_to_restore, self.device)
            self._rng_to_restore = None

    def on_train_epoch_start(self) -> None:
        # The sampler groups micro-batches into optimizer steps; a trainer that accumulates
        # differently (e.g. a GradientAccumulationScheduler) would mis-normalise the loss.
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "check_trainer_matches"):
            datamodule.check_trainer_matches(self.trainer)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step != self._logged_step:  # an optimizer step just finished
            self._logged_step = self.trainer.global_step
            stats = self._train_stats
            stats.reduce(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
            logs = stats.means("train", self.task_names)
            # The EMA follows CE, which stays comparable across the CE -> DFT switch.
            ce = logs.get("train/ce", float("nan"))
            if math.isfinite(ce):  # a non-finite step (skipped by NonFiniteGuard) must not poison it for good
                self._ce_ema = ce if self._ce_ema is None else 0.98 * self._ce_ema + 0.02 * ce
            logs["train/dft_active"] = float(self.loss_kind == "dft")
            if self._ce_ema is not None:
                logs["train/ce_ema"] = self._ce_ema
                self.log("ce_ema", self._ce_ema, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
            # Logged by every rank (the values are already reduced): a callback may monitor them.
            self.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)
            stats.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _evaluation_step(self, batch: Any, batch_idx: int) -> None:
        """Add one validation/test micro-batch's per-token CE statistics (whatever the training loss)."""
        result, mask, token_task = self._token_loss(batch, "ce")
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "val_batch_is_repeat") and datamodule.val_batch_is_repeat(batch_idx):
            return  # a copy that only keeps the ranks in step: counted once, on its own rank
        self._eval_stats = self._stats(self._eval_stats)
        self._eval_stats.add(result.ce, result.ce, result.dft, result.correct, mask, token_task)

    def _log_evaluation(self, prefix: str) -> None:
        """Log the evaluation epoch's statistics as `{prefix}/loss`, `{prefix}/ce`, ... and reset them."""
        if self._eval_stats is None:
            return
        stats = self._eval_stats
        stats.reduce(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        logs = stats.means(prefix, self.task_names)
        # {prefix}/loss is CE whatever the training loss: comparable across the CE -> DFT switch.
        # Every rank logs the same reduced values, so ModelCheckpoint can monitor val/loss on all
        # ranks (a rank-zero-only metric would leave the others without it and deadlock a save).
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=1)
        if f"{prefix}/loss" in logs:
            self.log(f"{prefix}_loss", logs[f"{prefix}/loss"], prog_bar=True, on_epoch=True, batch_size=1)
        stats.reset()

    # ------------------------------------------------------------- predict
    def on_predict_start(self) -> None:
        from litovis.inference.predictor import Predictor

        if hasattr(self.model, "merge_adapter"):
            self.model.merge_adapter()  # decode at base-model cost; predict never trains
        self.ovis.eval()
        tokenizer = self.trainer.datamodule.processor.tokenizer
        self._predictor = Predictor(self.ovis, tokenizer, self.predict_cfg)

    def predict_step(self, batch: list, batch_idx: int) -> list[dict[str, str]]:
        return self._predictor(batch)

    # ----------------------------------------------------------- checkpoints
    def trainable_names(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:
        """The trainable weights only: what a checkpoint holds (the frozen base comes from `source`).

        Filtered here rather than only in `on_save_checkpoint` because sharded strategies build
        checkpoints from this method: FSDP would otherwise gather the whole frozen base to save
        it, and expect to find it when loading a sharded checkpoint.
        """
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + name for name in self.trainable_names()}
        for key in [k for k in state if k.startswith(prefix) and k not in keep]:
            del state[key]
        return state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoint["state_dict"] is already `self.state_dict()`: the trainable weights only.
        if self._pissa_initial is not None:
            checkpoint["pissa_initial"] = self._pissa_initial
        # Lightning does not save RNG state; LoRA dropout needs it, on every rank, for an exact resume.
        checkpoint["rng"] = gather_rng_states(self.device)
        checkpoint["litovis"] = {
            "source": asdict(self.source),
            "finetune": self.finetune,
            "lora": asdict(self.lora) if self.finetune == "lora" else None,
            "trainable": asdict(self.trainable),
            "trainable_names": sorted(self.trainable_names()),
            "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "loss_kind": self.loss_kind,
            "global_step": self.trainer.global_step if self._trainer is not None else None,
            "world_size": self.trainer.world_size if self._trainer is not None else 1,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = set(self.trainable_names())
        if "state_dict" in checkpoint:
            found = set(checkpoint["state_dict"])
        else:  # a sharded strategy has loaded the weights itself (and taken them out)
            found = set(checkpoint.get("litovis", {}).get("trainable_names", []))
        if expected != found:
            missing, unexpected = sorted(expected - found), sorted(found - expected)
            raise KeyError(
                f"checkpoint does not match the trainable parameters: {len(missing)} missing "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
                "was it written with another LoRA/trainable configuration?"
            )
        self._rng_to_restore = rank_rng_state(checkpoint.get("rng"), self.global_rank if self._trainer is not None else 0)
        initial = checkpoint.get("pissa_initial")
        if self.finetune == "lora" and self.lora.is_pissa:
            if initial is None:
                raise KeyError("this run uses PiSSA but the checkpoint carries no PiSSA initial state")
            restore_pissa_residual_on_ranks(self.model, initial)
            self._pissa_initial = initial
            self._pissa_pending = False
        elif initial is not None:
            raise ValueError("the checkpoint was trained with PiSSA: set lora.init to its PiSSA init")
