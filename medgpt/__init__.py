"""Shared code for the stage scripts: arguments, data, models, training glue and generation."""

import logging
import warnings

# Library notices that are no concern of a user of the toolkit, silenced here because every script imports
# this package before the libraries (peft imports bitsandbytes, which logs while it is imported, before
# any script has set up logging):
# - bitsandbytes, on CPUs with AVX-512 BF16, logs "Failed to load CPU gemm_4bit_forward from
#   kernels-community" where the optional `kernels` package is absent (its own CPU kernels run instead),
#   and in 8-bit training a cast notice on every matrix multiply. Its errors still show.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# - transformers 5 renamed gradient checkpointing to activation checkpointing; peft and TRL still call the
#   old names on every model they wrap. (The --gradient_checkpointing flag's own notice stays: it says
#   what to use instead.)
warnings.filterwarnings("ignore", message=r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated",
                        category=FutureWarning, module=r"transformers\.modeling_utils")
