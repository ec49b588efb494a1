from athena.adapters.poly.layer import PolyAdapter, base_dims

__all__ = ["PolyAdapter", "base_dims"]
