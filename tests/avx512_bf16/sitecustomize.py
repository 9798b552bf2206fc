"""On PYTHONPATH, makes bitsandbytes take the path it takes on a CPU with AVX-512 BF16 on any CPU: importing
it then tries the optional `kernels` package and logs "Failed to load CPU gemm_4bit_forward from
kernels-community" where that is missing. The stage tests check that no such line reaches the user; this
lets them fail on machines whose CPU lacks the instructions. (Only 4-bit layers use the kernel it picks.)"""

import importlib.abc
import importlib.util
import sys


class _ReportAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            module.has_avx512bf16 = lambda: True

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _ReportAvx512Bf16())
