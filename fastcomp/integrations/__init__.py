"""fastcomp inside other libraries' models: ``fastcomp.integrations.diffusers`` (attention processors for
diffusers UNets and transformers). NATTEN models: ``fastcomp.patch.replace_natten``."""
