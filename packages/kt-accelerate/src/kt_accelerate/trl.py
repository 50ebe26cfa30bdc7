"""``KTSFTTrainer``: TRL's ``SFTTrainer`` with kt (needs ``pip install trl``)."""

from __future__ import annotations

from kt_accelerate.trainer import KTTrainerMixin

try:
    from trl import SFTTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kt_accelerate.KTSFTTrainer needs TRL: pip install 'kt-accelerate[trl]'"
    ) from exc

__all__ = ["KTSFTTrainer"]


class KTSFTTrainer(KTTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with kt (see :class:`kt_accelerate.KTTrainerMixin`); takes
    ``kt_plugin=``. A model name is loaded with :func:`kt_accelerate.load_model` (experts
    straight into the engine); ``peft_config`` is applied by TRL after kt wrapped the model."""
