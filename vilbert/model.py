"""ViLBERT in Paddle: two-stream BERT with co-attention for referring expressions.

Lu, Batra, Parikh, Lee. "ViLBERT: Pretraining Task-Agnostic Visiolinguistic Representations for
Vision-and-Language Tasks", NeurIPS 2019 (arXiv:1908.02265).

Read top to bottom: the embeddings of each stream, the post-LN transformer layer that both streams use on
their own, the co-attention layer where text attends to regions and regions attend to text, the encoder
that interleaves them, the poolers, the answer classifiers, and `VILBertForVLTasks` with its task heads.

The function is the official one (jiasenlu/vilbert_beta, facebookresearch/vilbert-multi-task), and every
parameter name is an official state_dict key, so released checkpoints map one to one (`vilbert/checkpoint.py`).
Names such as `LayerNorm`, `biOutput` and `LayerNorm1` are not snake-cased for that reason. The task heads,
each built only when asked for: `vision_logit` (one logit per region: referring expressions), `vil_prediction`
(answer scores: VQA; vilbert_beta's or 12-in-1's classifier, whose checkpoints differ) and `vil_logit` (one
score per image-text pair: VCR, retrieval). Left out on purpose: the pretraining heads (`cls.*`), 12-in-1's
other heads (`vil_prediction_gqa`, `vil_binary_prediction`, `vil_tri_prediction`), `linguisic_logit`, and
`biOutput.q_dense1/2`, which the official forward never calls; the loader drops them from checkpoints with a
notice.

Shapes: B batch, T tokens, N regions, H heads, D head width.
"""

import math
from dataclasses import dataclass
from typing import Optional

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .config import ViLBertConfig
from .layers import Dropout, LayerNorm, Linear, WeightNormLinear

LAYER_NORM_EPS = 1e-12  # hard-coded in the official code, not read from the config
MASK_VALUE = -10000.0  # additive mask value of the official code (not -inf: padded regions keep a finite logit)


def _activation(name: str) -> nn.Layer:
    return nn.GELU() if name == "gelu" else nn.ReLU()  # GELU is the exact (erf) form, as official


def extended_mask(mask: paddle.Tensor, dtype) -> paddle.Tensor:
    """[B, L] 1/0 mask -> [B, 1, 1, L] additive mask: 0 where attended, -10000 where masked."""
    return (1.0 - mask.astype(dtype)).unsqueeze([1, 2]) * MASK_VALUE


def _split_heads(x: paddle.Tensor, num_heads: int) -> paddle.Tensor:
    return x.reshape([0, 0, num_heads, -1]).transpose([0, 2, 1, 3])  # [B, L, H*D] -> [B, H, L, D]


def _attend(query, key, value, mask, dropout: Dropout) -> paddle.Tensor:
    """Scaled dot-product attention of [B, H, Lq, D] queries over [B, H, Lk, D]; returns [B, Lq, H*D]."""
    scores = paddle.matmul(query, key, transpose_y=True) / math.sqrt(query.shape[-1]) + mask
    context = paddle.matmul(dropout(F.softmax(scores, axis=-1)), value)  # [B, H, Lq, D]
    return context.transpose([0, 2, 1, 3]).flatten(2)  # [B, Lq, H*D]


# ----------------------------------------------------------------------------------------------------
# Embeddings


class BertEmbeddings(nn.Layer):
    """Token + position + segment embeddings (+ the 12-in-1 task token), LayerNorm, dropout."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        # No padding_idx: in PyTorch it only freezes row 0, which the official init still fills; Paddle
        # would return zeros for [PAD] and change text outputs at padded positions (model_spec.md §10.3).
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        if config.task_specific_tokens:
            self.task_embeddings = nn.Embedding(config.num_task_tokens, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, epsilon=LAYER_NORM_EPS)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, task_ids=None):
        positions = paddle.arange(input_ids.shape[1]).unsqueeze(0)
        embeddings = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
                      + self.token_type_embeddings(token_type_ids))
        if task_ids is not None:
            # the task token goes right after [CLS], with no position or segment embedding (as 12-in-1)
            embeddings = paddle.concat([embeddings[:, :1], self.task_embeddings(task_ids), embeddings[:, 1:]], axis=1)
        return self.dropout(self.LayerNorm(embeddings))


class BertImageEmbeddings(nn.Layer):
    """Region feature + 5-d location ([x1/W, y1/H, x2/W, y2/H, area fraction]) -> v_hidden_size."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.image_embeddings = Linear(config.v_feature_size, config.v_hidden_size)
        self.image_location_embeddings = Linear(5, config.v_hidden_size)
        self.LayerNorm = LayerNorm(config.v_hidden_size, epsilon=LAYER_NORM_EPS)
        self.dropout = Dropout(config.hidden_dropout_prob)  # the text-stream rate, as official

    def forward(self, features, locations):
        return self.dropout(self.LayerNorm(self.image_embeddings(features) + self.image_location_embeddings(locations)))


# ----------------------------------------------------------------------------------------------------
# Single-stream layer (text: 768 wide, 12 heads; vision: 1024 wide, 8 heads)


class BertSelfAttention(nn.Layer):
    def __init__(self, hidden_size: int, num_heads: int, dropout_prob: float):
        super().__init__()
        self.num_heads = num_heads
        self.query = Linear(hidden_size, hidden_size)
        self.key = Linear(hidden_size, hidden_size)
        self.value = Linear(hidden_size, hidden_size)
        self.dropout = Dropout(dropout_prob)

    def forward(self, hidden, mask):
        q, k, v = (_split_heads(proj(hidden), self.num_heads) for proj in (self.query, self.key, self.value))
        return _attend(q, k, v, mask, self.dropout)


class BertResidualOutput(nn.Layer):
    """dense -> dropout -> LayerNorm(+ residual): the official `BertSelfOutput` and `BertOutput`."""

    def __init__(self, in_size: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.dense = Linear(in_size, hidden_size)
        self.LayerNorm = LayerNorm(hidden_size, epsilon=LAYER_NORM_EPS)
        self.dropout = Dropout(dropout_prob)

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertIntermediate(nn.Layer):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.dense = Linear(hidden_size, intermediate_size)
        self.act = _activation(act)

    def forward(self, hidden):
        return self.act(self.dense(hidden))


class BertAttention(nn.Layer):
    def __init__(self, hidden_size: int, num_heads: int, hidden_dropout: float, attention_dropout: float):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, num_heads, attention_dropout)
        self.output = BertResidualOutput(hidden_size, hidden_size, hidden_dropout)

    def forward(self, hidden, mask):
        return self.output(self.self(hidden, mask), hidden)


class BertLayer(nn.Layer):
    """Post-LN transformer layer; the official BertLayer and BertImageLayer differ only in sizes."""

    def __init__(self, hidden_size, num_heads, intermediate_size, act, hidden_dropout, attention_dropout):
        super().__init__()
        self.attention = BertAttention(hidden_size, num_heads, hidden_dropout, attention_dropout)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size, act)
        self.output = BertResidualOutput(intermediate_size, hidden_size, hidden_dropout)

    def forward(self, hidden, mask):
        attended = self.attention(hidden, mask)
        return self.output(self.intermediate(attended), attended)


def text_layer(config: ViLBertConfig) -> BertLayer:
    return BertLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size, config.hidden_act,
                     config.hidden_dropout_prob, config.attention_probs_dropout_prob)


def image_layer(config: ViLBertConfig) -> BertLayer:
    return BertLayer(config.v_hidden_size, config.v_num_attention_heads, config.v_intermediate_size,
                     config.v_hidden_act, config.v_hidden_dropout_prob, config.v_attention_probs_dropout_prob)


# ----------------------------------------------------------------------------------------------------
# Co-attention: index 1 is the vision stream, index 2 the text stream, as in the official names


class BertBiAttention(nn.Layer):
    """Each stream's queries attend over the other stream's keys and values, in bi_hidden_size."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.num_heads = config.bi_num_attention_heads
        bi = config.bi_hidden_size
        self.query1 = Linear(config.v_hidden_size, bi)
        self.key1 = Linear(config.v_hidden_size, bi)
        self.value1 = Linear(config.v_hidden_size, bi)
        self.dropout1 = Dropout(config.v_attention_probs_dropout_prob)
        self.query2 = Linear(config.hidden_size, bi)
        self.key2 = Linear(config.hidden_size, bi)
        self.value2 = Linear(config.hidden_size, bi)
        self.dropout2 = Dropout(config.attention_probs_dropout_prob)

    def forward(self, image, image_mask, text, text_mask):
        """Returns (text attending to regions [B, T, bi], regions attending to text [B, N, bi])."""
        q1, k1, v1 = (_split_heads(p(image), self.num_heads) for p in (self.query1, self.key1, self.value1))
        q2, k2, v2 = (_split_heads(p(text), self.num_heads) for p in (self.query2, self.key2, self.value2))
        text_context = _attend(q2, k1, v1, image_mask, self.dropout1)
        image_context = _attend(q1, k2, v2, text_mask, self.dropout2)
        return text_context, image_context


class BertBiOutput(nn.Layer):
    """Projects each attended context back to its stream's width, with dropout and residual LayerNorm."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.dense1 = Linear(config.bi_hidden_size, config.v_hidden_size)
        self.LayerNorm1 = LayerNorm(config.v_hidden_size, epsilon=LAYER_NORM_EPS)
        self.dropout1 = Dropout(config.v_hidden_dropout_prob)
        self.dense2 = Linear(config.bi_hidden_size, config.hidden_size)
        self.LayerNorm2 = LayerNorm(config.hidden_size, epsilon=LAYER_NORM_EPS)
        self.dropout2 = Dropout(config.hidden_dropout_prob)

    def forward(self, image_context, image, text_context, text):
        image = self.LayerNorm1(self.dropout1(self.dense1(image_context)) + image)
        text = self.LayerNorm2(self.dropout2(self.dense2(text_context)) + text)
        return image, text


class BertConnectionLayer(nn.Layer):
    """Co-attention block: bi-attention, bi-output, then each stream's own feed-forward."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.biattention = BertBiAttention(config)
        self.biOutput = BertBiOutput(config)
        self.v_intermediate = BertIntermediate(config.v_hidden_size, config.v_intermediate_size, config.v_hidden_act)
        self.v_output = BertResidualOutput(config.v_intermediate_size, config.v_hidden_size,
                                           config.v_hidden_dropout_prob)
        self.t_intermediate = BertIntermediate(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.t_output = BertResidualOutput(config.intermediate_size, config.hidden_size, config.hidden_dropout_prob)

    def forward(self, image, image_mask, text, text_mask):
        text_context, image_context = self.biattention(image, image_mask, text, text_mask)
        image, text = self.biOutput(image_context, image, text_context, text)
        image = self.v_output(self.v_intermediate(image), image)
        text = self.t_output(self.t_intermediate(text), text)
        return image, text


class BertEncoder(nn.Layer):
    """Runs each stream's own layers up to the next co-attention point, then the co-attention layer.

    For co-attention k the text stream first runs layers [t_start, t_biattention_id[k]) and the vision
    stream layers [v_start, v_biattention_id[k]); after the last one, each stream runs its remaining layers.
    For bert_base_6layer_6conect that is text 0-5 -> c0 -> (text 6+k, vision k for k=0..4, then c(k+1))
    -> text 11, vision 5. The streams meet only in co-attention, so their relative order is free.
    """

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.v_biattention_id = list(config.v_biattention_id)
        self.t_biattention_id = list(config.t_biattention_id)
        self.layer = nn.LayerList([text_layer(config) for _ in range(config.num_hidden_layers)])
        self.v_layer = nn.LayerList([image_layer(config) for _ in range(config.v_num_hidden_layers)])
        self.c_layer = nn.LayerList([BertConnectionLayer(config) for _ in self.v_biattention_id])

    def forward(self, text, image, text_mask, image_mask):
        t_start = v_start = 0
        for connection, t_end, v_end in zip(self.c_layer, self.t_biattention_id, self.v_biattention_id):
            for layer in self.layer[t_start:t_end]:
                text = layer(text, text_mask)
            for layer in self.v_layer[v_start:v_end]:
                image = layer(image, image_mask)
            image, text = connection(image, image_mask, text, text_mask)
            t_start, v_start = t_end, v_end
        for layer in self.layer[t_start:]:
            text = layer(text, text_mask)
        for layer in self.v_layer[v_start:]:
            image = layer(image, image_mask)
        return text, image


class BertPooler(nn.Layer):
    """First position ([CLS] / the whole-image region) -> bi_hidden_size, ReLU (not BERT's tanh)."""

    def __init__(self, hidden_size: int, bi_hidden_size: int):
        super().__init__()
        self.dense = Linear(hidden_size, bi_hidden_size)

    def forward(self, hidden):
        return F.relu(self.dense(hidden[:, 0]))


class BertModel(nn.Layer):
    """The two-stream trunk (`bert.*` in the official checkpoints)."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.v_embeddings = BertImageEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.t_pooler = BertPooler(config.hidden_size, config.bi_hidden_size)
        self.v_pooler = BertPooler(config.v_hidden_size, config.bi_hidden_size)

    def forward(self, input_txt, input_imgs, image_loc, token_type_ids, attention_mask, image_attention_mask,
                task_ids=None):
        if task_ids is not None:  # the task token is always attended
            attention_mask = paddle.concat([paddle.ones_like(attention_mask[:, :1]), attention_mask], axis=1)
        dtype = self.v_embeddings.LayerNorm.weight.dtype
        text = self.embeddings(input_txt, token_type_ids, task_ids)
        image = self.v_embeddings(input_imgs.astype(dtype), image_loc.astype(dtype))
        text, image = self.encoder(text, image, extended_mask(attention_mask, text.dtype),
                                   extended_mask(image_attention_mask, image.dtype))
        return text, image, self.t_pooler(text), self.v_pooler(image)


# ----------------------------------------------------------------------------------------------------
# Answer classifiers on the fused pooled vector (`vil_prediction`): the two families' checkpoints differ


class SimpleClassifier(nn.Layer):
    """vilbert_beta's: weight-normed Linear, ReLU, dropout 0.5, weight-normed Linear (keys `main.{0,3}.*`)."""

    def __init__(self, in_size: int, hidden_size: int, num_labels: int, dropout_prob: float = 0.5):
        super().__init__()
        self.main = nn.Sequential(WeightNormLinear(in_size, hidden_size), nn.ReLU(), Dropout(dropout_prob),
                                  WeightNormLinear(hidden_size, num_labels))

    def forward(self, pooled):
        return self.main(pooled)


class MultiTaskSimpleClassifier(nn.Layer):
    """12-in-1's: Linear, GELU (erf), LayerNorm, Linear, no dropout (keys `logit_fc.{0,2,3}.*`)."""

    def __init__(self, in_size: int, hidden_size: int, num_labels: int):
        super().__init__()
        self.logit_fc = nn.Sequential(Linear(in_size, hidden_size), nn.GELU(),
                                      LayerNorm(hidden_size, epsilon=LAYER_NORM_EPS), Linear(hidden_size, num_labels))

    def forward(self, pooled):
        return self.logit_fc(pooled)


CLASSIFIERS = {"beta": SimpleClassifier, "12in1": MultiTaskSimpleClassifier}
TASK_HEADS = ("vision_logit", "vil_prediction", "vil_logit")


@dataclass
class ViLBertOutput:
    pooled_output_t: paddle.Tensor  # [B, bi_hidden_size]
    pooled_output_v: paddle.Tensor  # [B, bi_hidden_size]
    sequence_output_t: paddle.Tensor  # [B, T, hidden_size] (T + 1 with a task token)
    sequence_output_v: paddle.Tensor  # [B, N, v_hidden_size]
    vision_logit: Optional[paddle.Tensor] = None  # [B, N, 1] float32, padded regions at about -10000
    vil_prediction: Optional[paddle.Tensor] = None  # [B, num_labels] float32
    vil_logit: Optional[paddle.Tensor] = None  # [B, 1] float32


class VILBertForVLTasks(nn.Layer):
    """The trunk plus the task heads named in `heads` (a head not built is None in the output).

    - `vision_logit`: one logit per region, padded regions pushed to -10000 (referring expressions);
    - `vil_prediction`: `num_labels` answer scores from `classifier` "beta" (`SimpleClassifier`) or "12in1"
      (`MultiTaskSimpleClassifier`) on the fused pooled vector;
    - `vil_logit`: one score of the fused pooled vector.
    The fused vector is dropout(pooled_t * pooled_v) (`fusion_method` "mul"; "sum" adds), as official.
    """

    def __init__(self, config: ViLBertConfig, *, heads=("vision_logit",), num_labels: int = 0,
                 classifier: str = "beta", dropout_prob: float = 0.1):
        super().__init__()
        unknown = sorted(set(heads) - set(TASK_HEADS))
        if unknown:
            raise ValueError(f"unknown task head(s) {unknown}: the model has {', '.join(TASK_HEADS)}")
        if "vil_prediction" in heads and (classifier not in CLASSIFIERS or num_labels < 1):
            raise ValueError(f"vil_prediction needs classifier 'beta' or '12in1' (got {classifier!r}) and "
                             f"num_labels >= 1 (got {num_labels})")
        self.config = config
        self.heads = tuple(head for head in TASK_HEADS if head in heads)
        self.bert = BertModel(config)
        self.dropout = Dropout(dropout_prob)
        if "vil_prediction" in heads:
            self.vil_prediction = CLASSIFIERS[classifier](config.bi_hidden_size, 2 * config.bi_hidden_size,
                                                          num_labels)
        if "vil_logit" in heads:
            self.vil_logit = Linear(config.bi_hidden_size, 1)
        if "vision_logit" in heads:
            self.vision_logit = Linear(config.v_hidden_size, 1)
        self.apply(lambda layer: init_weights(layer, config.initializer_range))

    def forward(self, input_txt, input_imgs, image_loc, token_type_ids=None, attention_mask=None,
                image_attention_mask=None, co_attention_mask=None, task_ids=None) -> ViLBertOutput:
        """Official argument order. `co_attention_mask` [B, N, T] is accepted for that reason only: the
        official model builds it and never applies it. `task_ids` [B, 1] is for 12-in-1 task-token models."""
        if token_type_ids is None:
            token_type_ids = paddle.zeros_like(input_txt)
        if attention_mask is None:
            attention_mask = paddle.ones_like(input_txt)
        if image_attention_mask is None:
            image_attention_mask = paddle.ones(input_imgs.shape[:2], dtype="int64")
        text, image, pooled_t, pooled_v = self.bert(input_txt, input_imgs, image_loc, token_type_ids,
                                                    attention_mask, image_attention_mask, task_ids)
        output = ViLBertOutput(pooled_output_t=pooled_t, pooled_output_v=pooled_v, sequence_output_t=text,
                               sequence_output_v=image)
        # Each head's scores are ranked (regions, answers, candidates): in bfloat16 (8-bit mantissa) close ones tie,
        # which cost the demo's weakly trained models most of their accuracy (tools/bf16_numerics.py), so the heads
        # run in float32.
        with paddle.amp.auto_cast(enable=False):
            if "vil_prediction" in self.heads or "vil_logit" in self.heads:
                pooled_t, pooled_v = pooled_t.astype("float32"), pooled_v.astype("float32")
                fused = pooled_t * pooled_v if self.config.fusion_method == "mul" else pooled_t + pooled_v
                pooled = self.dropout(fused)  # [B, bi_hidden_size]
                if "vil_prediction" in self.heads:
                    output.vil_prediction = self.vil_prediction(pooled)
                if "vil_logit" in self.heads:
                    output.vil_logit = self.vil_logit(pooled)
            if "vision_logit" in self.heads:
                padding = (1.0 - image_attention_mask.astype("float32")) * MASK_VALUE  # [B, N]
                output.vision_logit = self.vision_logit(self.dropout(image.astype("float32"))) + padding.unsqueeze(2)
        return output


def init_weights(layer: nn.Layer, std: float) -> None:
    """Official init: N(0, std) for Linear and Embedding weights, zero biases, unit LayerNorm. A weight-normed
    Linear keeps its own g and v (see WeightNormLinear) and gets a zero bias, as there."""
    if isinstance(layer, (nn.Linear, nn.Embedding)):
        nn.initializer.Normal(mean=0.0, std=std)(layer.weight)
    if isinstance(layer, (nn.Linear, WeightNormLinear)) and layer.bias is not None:
        nn.initializer.Constant(0.0)(layer.bias)
    if isinstance(layer, nn.LayerNorm):
        nn.initializer.Constant(1.0)(layer.weight)
        nn.initializer.Constant(0.0)(layer.bias)
