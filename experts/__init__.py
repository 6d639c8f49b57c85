"""LoRA math: LoraSpec, Adapter, LoraBank (E adapters stacked), RoutedLinear, inject/merge, PEFT I/O."""

from loraplex.experts.spec import DEFAULT_TARGETS, FFN_TARGETS, Adapter, LoraSpec

__all__ = ["Adapter", "LoraSpec", "DEFAULT_TARGETS", "FFN_TARGETS"]
