"""BERT-family encoders: BERT, RoBERTa, XLM-R, ELECTRA, MiniLM (a BERT)."""

from slimformer.adapters.base import BlockLayout, ModelAdapter
from slimformer.adapters.registry import register_adapter


@register_adapter
class BertAdapter(ModelAdapter):
    family = "bert"
    model_types = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert"})
    block_paths = ("encoder.layer", "encoder.layers")
    layout = BlockLayout(
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attention_out="attention.output.dense",
        ffn_in=("intermediate.dense",),
        ffn_out="output.dense",
    )
