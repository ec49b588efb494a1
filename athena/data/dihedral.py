"""The 8 symmetries of the square (dihedral group D4) acting on 2-D grids, used to augment mazes, ARC
tasks and Sudoku-X. Transform k: rotate (k % 4) quarter turns counter-clockwise, then transpose if k >= 4."""

from __future__ import annotations

import numpy as np

NUM_DIHEDRAL = 8


def dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    rotated = np.rot90(grid, k % 4)
    return np.ascontiguousarray(rotated.T if k >= 4 else rotated)


def inverse_dihedral_index(k: int) -> int:
    # Rotations invert by turning back; rotation-then-transpose is a reflection, its own inverse.
    return (4 - k) % 4 if k < 4 else k


def inverse_dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    return dihedral(grid, inverse_dihedral_index(k))
