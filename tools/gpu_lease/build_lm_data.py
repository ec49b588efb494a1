"""Build the LM datasets a GPU lease carries into /tmp/athena_gpu_data (the folder the GPU machine unpacks them to;
the text task configs hold absolute paths, so the folder must be the same on both machines).

    python tools/gpu_lease/build_lm_data.py sft_fortune_topics sft_wordnet_gloss sft_wordnet_category
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from athena.config import validate_config  # noqa: E402  (also registers the resolvers conf/ reads)
from athena.data.build import ensure_dataset  # noqa: E402

DATA_ROOT = "/tmp/athena_gpu_data"

with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
    for name in sys.argv[1:]:
        cfg = compose("config", overrides=["experiment=lm_adapt", f"data={name}", f"data_root={DATA_ROOT}"])
        run = validate_config(OmegaConf.to_container(cfg, resolve=True))
        print(ensure_dataset(run.dataset_dir(), dict(run.data.build)))
