"""Run tools/convert_hf_to_megatron.py (under torchrun: sharded; plain python: one process) and print this
rank's peak RSS growth above the baseline taken after the imports (``ru_maxrss``).

Usage: [torchrun --nproc-per-node=N] convert_sharded.py --hf-dir HF --save OUT [layout flags]
Prints ``CONVERT_DONE rank=R rc=RC peak_growth_mib=X baseline_mib=Y`` on every rank.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import sys
import warnings

warnings.filterwarnings("ignore")


def main() -> int:
    import megatron.core.dist_checkpointing  # noqa: F401  (imports are the baseline, not the conversion)
    import torch  # noqa: F401

    from megatron_rspo import checkpoint  # noqa: F401
    from megatron_rspo.convert import convert_hf_to_megatron  # noqa: F401
    from megatron_rspo.model import provider  # noqa: F401

    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_hf_to_megatron.py")
    spec = importlib.util.spec_from_file_location("convert_hf_to_megatron_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rc = tool.main(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"CONVERT_DONE rank={os.environ.get('RANK', '0')} rc={rc} peak_growth_mib={peak - base:.1f} "
          f"baseline_mib={base:.1f}", flush=True)
    return rc


if __name__ == "__main__":  # dist_checkpointing may spawn worker processes
    sys.exit(main())
