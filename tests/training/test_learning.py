"""A tiny TRM really learns: 4x4 Sudoku test accuracy goes from chance to high on a CPU.

Train and test puzzles are disjoint up to every validity-preserving shuffle, so this is
generalisation to unseen puzzles, not recall."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from athena.config import validate_config
from athena.training.recipe import PretrainRecipe
from helpers import CONF

pytestmark = pytest.mark.slow  # 300 training steps in process


# One intra-op thread (conftest.one_thread, which gives the count back after): two threads were faster on a quiet
# 2-core machine (95 s) but, with another process busy beside it, OpenMP's spinning workers made this test take
# 16 minutes; a test must not depend on a quiet machine.
@pytest.mark.usefixtures("one_thread")
def test_small_trm_learns_4x4_sudoku(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("ATHENA_DATA_DIR", str(data_root))
    overrides = ["data=sudoku4", "device=cpu", "train.steps=300", "train.global_batch_size=64", "train.lr=3e-3",
                 "train.lr_warmup_steps=20", "train.eval_every=null", "train.checkpoint_every=null",
                 "train.log_every=50", "arch.halt_max_steps=4"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    config = OmegaConf.to_container(cfg, resolve=True)
    recipe = PretrainRecipe(validate_config(config), tmp_path)
    recipe.setup()
    before = recipe.evaluate(max_examples=None).result
    recipe.train()
    after = recipe.finish().result
    assert before.count == after.count == 12
    assert before.exact_accuracy == 0.0  # guessing ~11 blanks of 4 candidates: ~2e-7
    assert after.exact_accuracy >= 0.75, after.summary()
    assert after.token_accuracy > 0.9
