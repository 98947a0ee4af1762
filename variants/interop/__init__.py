"""Other libraries' formats and layers: peft's adapter files (``peft_format``) and bitsandbytes'
quantized layers (``bnb_layers``, imported on first use by QLoRA). Nothing here is imported with
``variants``."""
