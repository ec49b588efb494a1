from athena.adapters.bottleneck.layer import BottleneckAdapter

__all__ = ["BottleneckAdapter"]
