from athena.adapters.hybrid.model import BottleneckWrapper, add_hybrid_adapter_to_model

__all__ = ["BottleneckWrapper", "add_hybrid_adapter_to_model"]
