"""Build the LM datasets a GPU lease carries into /tmp/athena_gpu_data (the folder the GPU machine unpacks them to;
the text task configs hold absolute paths, so the folder must be the same on both machines).

    python tools/gpu_lease/build_lm_data.py sft_fortune_topics sft_wordnet_gloss sft_wordnet_category
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from athena.config import compose_config, validate_config  # noqa: E402
from athena.data.build import ensure_dataset  # noqa: E402

DATA_ROOT = "/tmp/athena_gpu_data"

for name in sys.argv[1:]:
    run = validate_config(compose_config(["experiment=lm_adapt", f"data={name}", f"data_root={DATA_ROOT}"]))
    print(ensure_dataset(run.dataset_dir(), dict(run.data.build)))
