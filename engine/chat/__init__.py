"""Chat templates (`lumen.engine.chat`): a conversation rendered to prompt text as Hugging Face
transformers renders it, in a Jinja sandbox bounded in time and size (template.py, sandbox.py)."""
from lumen.engine.chat.template import (
    MAX_TEMPLATE_BYTES,
    ChatTemplate,
    ChatTemplateError,
    RenderedChat,
    template_from_gguf,
    template_from_hf_dir,
)

__all__ = ["MAX_TEMPLATE_BYTES", "ChatTemplate", "ChatTemplateError", "RenderedChat",
           "template_from_gguf", "template_from_hf_dir"]
