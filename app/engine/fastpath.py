"""A lean eager decode step for Llama-architecture models: Hugging Face's logits with half its ops or fewer.

A decode step through ``model(...)`` spends much of its time outside the matrix
products: ~1900-3200 small aten ops and HF's Python per step (masks, rotary, kwargs,
wrappers) for SmolLM2-135M.  ``FastDecoder.step`` reads the model's own weights and
runs the same arithmetic with the fewest ops it can: one rotary table lookup and one
mask per step, then per layer two norms, the projections, one rotary product for
queries and keys together, two in-place cache writes and one fused attention kernel
(790-1670 ops per step).  Measured with ``python -m bench.decode_step`` (SmolLM2-135M
int8, 1 thread, shared 2-core machine, CPU ms): batch 1 at 100 cached tokens 24 ms
against HF's 36; at 1000 tokens 31 against 46; 8 rows x 5 tokens 170 against 434.

It copies no weight matrix; with int8 Linears the q/k/v rows of each layer are also
stacked into one packed matrix (``fuse``, see ``FastDecoder``).  torch.compile cannot
trace fbgemm's packed op, and inductor's own int8 kernels measured 2.5-28x slower than
fbgemm at one row, so on the CPU the win is this eager step; compiling it with float
Linears saved under 5% on SmolLM2-135M float32 after 40-100 s of compilation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .int8 import REDUCE_RANGE, Int8Linear, per_token_input

log = logging.getLogger(__name__)

KeysValues = tuple[torch.Tensor, torch.Tensor]

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# Rotary variants whose frequencies and scaling do not depend on the sequence length, so a table
# of cos/sin per position computed from the model's own inv_freq and attention_scaling reproduces
# them (DeepSeek-Coder uses linear, Llama 3.x llama3, long-context Qwen2.5 yarn).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = ("silu", "swish")
_DYNAMIC_LINEAR = torch.ao.nn.quantized.dynamic.Linear
_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default  # the overload itself: no per-call overload lookup


# Largest extra copy of stacked q/k/v weights the fused product may take.
FUSE_LIMIT_BYTES = 64 * 2**20


def fast_decoder(model: torch.nn.Module, setting: str, device: torch.device) -> "FastDecoder | None":
    """The decode step a ``decode_step`` setting asks for: None means the model's own forward.

    ``auto`` is the fast step where the architecture has one, compiled on GPUs (CUDA graphs
    remove the launch cost that dominates small steps there) and eager on CPUs, where
    compiling the float32 step measured within 5% of eager after 37-98 s per shape and
    int8 cannot be compiled (dynamo cannot trace fbgemm's packed op).
    """
    if setting == "hf":
        return None
    compile = setting == "compiled" or (setting == "auto" and device.type == "cuda")
    return FastDecoder.for_model(model, compile=compile)


class Unsupported(ValueError):
    """A model the fast step cannot run exactly like Hugging Face's forward."""


# -- the Linear layers: what the step calls instead of module(x) --------------------------------------------------

def kind_of(module: torch.nn.Module) -> str:
    """How the step computes a Linear: ``float``, ``int8`` (dynamic, per-tensor activation scale),
    ``int8-per-token`` (Int8Linear) or ``module`` (its own forward)."""
    if type(module) is torch.nn.Linear:
        return "float"
    if isinstance(module, _DYNAMIC_LINEAR) and module._packed_params.dtype == torch.qint8:
        return "int8"
    if isinstance(module, Int8Linear):
        return "int8-per-token"
    return "module"


def _packed_of(module: torch.nn.Module) -> tuple[torch.ScriptObject, bool]:
    """(fbgemm packed weight, reduce_range) of an int8 or int8-per-token Linear, as its forward uses them."""
    if isinstance(module, _DYNAMIC_LINEAR):
        # DynamicQuantizedLinear.forward: modules saved before version 4 quantize without reduce_range.
        return module._packed_params._packed_params, module.version is not None and module.version >= 4
    return module._packed, REDUCE_RANGE


def _bias_of(module: torch.nn.Module) -> torch.Tensor | None:
    """The bias added after the product: inside the packed weight for dynamic Linears, so None there."""
    return None if isinstance(module, _DYNAMIC_LINEAR) else module.bias


def _stacked(modules: Sequence[torch.nn.Module]) -> torch.ScriptObject:
    """One packed int8 weight holding the modules' quantized rows one after another (and their packed biases)."""
    unpacked = [_packed_of(m)[0].unpack() for m in modules]
    weights = [w for w, _ in unpacked]
    if any(w.qscheme() != torch.per_channel_affine or w.q_per_channel_axis() != 0 for w in weights):
        raise Unsupported("int8 weights without a scale per output channel cannot be stacked")
    stacked = torch._make_per_channel_quantized_tensor(
        torch.cat([w.int_repr() for w in weights]),
        torch.cat([w.q_per_channel_scales() for w in weights]),
        torch.cat([w.q_per_channel_zero_points() for w in weights]), 0)
    biases = [b for _, b in unpacked]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0], dtype=torch.float32)
                          for b, w in zip(biases, weights)])
    return torch.ops.quantized.linear_prepack(stacked, bias)


def _finish(out: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    if scale is not None:
        out = out.mul_(scale)
    return out if bias is None else out.add_(bias)


Projections = Callable[[torch.Tensor], "torch.Tensor | Sequence[torch.Tensor]"]


def projections(modules: Sequence[torch.nn.Module], fuse: bool = False, split: bool = False) -> Projections:
    """A function giving ``[m(x) for m in modules]``: a list if ``split``, else side by side in one tensor.

    Int8 Linears that share the input share its quantization work; with ``fuse`` they
    also share one product over their stacked weights (an extra packed copy of them),
    which is exact: the activation's quantization depends on the input alone.
    """
    kinds = {kind_of(m) for m in modules}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    if kind in ("int8", "int8-per-token") and len({_packed_of(m)[1] for m in modules}) == 1:
        return _int8_projections(modules, kind == "int8-per-token", fuse, split)
    if kind == "float":
        pairs = [(m.weight, m.bias) for m in modules]
        outputs = lambda x: [F.linear(x, weight, bias) for weight, bias in pairs]  # noqa: E731
    else:
        calls = [m if m._forward_hooks or m._forward_pre_hooks else m.forward for m in modules]
        outputs = lambda x: [call(x) for call in calls]  # noqa: E731
    if len(modules) == 1:
        return (lambda x: outputs(x)) if split else (lambda x: outputs(x)[0])
    return outputs if split else (lambda x: torch.cat(outputs(x), dim=-1))


def _int8_projections(modules: Sequence[torch.nn.Module], per_token: bool, fuse: bool, split: bool) -> Projections:
    """:func:`projections` of int8 Linears of one kind, calling fbgemm's op directly (measured 22 us
    against 29 us through the module, 576x576 at one row)."""
    reduce_range = _packed_of(modules[0])[1]
    guard = modules[0].guard if per_token else None
    biases = [_bias_of(m) for m in modules]
    sizes = [m.out_features for m in modules]
    fused = fuse and len(modules) > 1
    if fused:
        packs = [_stacked(modules)]
        present = [b for b in biases if b is not None]
        biases = [torch.cat([b if b is not None else present[0].new_zeros(size) for b, size in zip(biases, sizes)])
                  if present else None]
    else:
        packs = [_packed_of(m)[0] for m in modules]

    def run(x: torch.Tensor):
        scale = None
        if guard is not None:
            x, scale = per_token_input(x, guard)
        outs = [_finish(_LINEAR_DYNAMIC(x, packed, reduce_range), scale, bias) for packed, bias in zip(packs, biases)]
        if fused:
            return outs[0].split(sizes, dim=-1) if split else outs[0]
        if split:
            return outs
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return run


@dataclass(eq=False)
class _Layer:
    """One decoder layer's weights, as functions and tensors the step calls directly."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Projections  # x -> [q | k | v] side by side
    o: Projections
    gate_up: Projections  # x -> (gate, up)
    down: Projections


class _Rotary:
    """cos and sign-folded sin per position, looked up in a table grown on demand (doubling)."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype, size: int) -> None:
        self.inv_freq = inv_freq.float()
        self.scaling = scaling
        self.dtype = dtype
        self.table = self._build(size)

    def _build(self, size: int) -> torch.Tensor:
        # Same arithmetic as HF's rotary forward (float32 position * inv_freq, cos/sin, times
        # attention_scaling, cast), so entries equal what it computes per step.
        positions = torch.arange(size, device=self.inv_freq.device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        half = freqs.shape[-1]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.scaling, emb.sin() * self.scaling
        # rotate_half(x) * sin == roll(x, half) * [-sin_1 | sin_2]: one roll instead of two slices, a neg and a cat.
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return torch.stack((cos, sin), dim=1).to(self.dtype)  # [size, 2, head_dim]

    def lookup(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for ``position_ids`` [rows, q], each [rows, q, 1, head_dim]."""
        needed = int(position_ids.max()) + 1
        if needed > self.table.shape[0]:
            self.table = self._build(max(needed, 2 * self.table.shape[0]))
        both = self.table[position_ids]  # one gather for both
        return both[:, :, :1], both[:, :, 1:]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [rows, q, heads, head_dim] (cos/sin from ``_Rotary``)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


def _check_architecture(model: torch.nn.Module) -> None:
    """Raise Unsupported unless ``model`` is a plain Llama/Qwen2 causal LM on one device."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise Unsupported(f"architecture {name} (supported: {', '.join(ARCHITECTURES)})")
    config = model.config
    if getattr(config, "hidden_act", None) not in ACTIVATIONS:
        raise Unsupported(f"activation {getattr(config, 'hidden_act', None)!r}")
    layer_types = getattr(config, "layer_types", None) or ()
    if any(kind != "full_attention" for kind in layer_types):
        raise Unsupported("sliding-window attention layers")
    rotary = model.model.rotary_emb
    if getattr(rotary, "rope_type", None) not in ROPE_TYPES:
        raise Unsupported(f"rotary type {getattr(rotary, 'rope_type', None)!r} (supported: {', '.join(ROPE_TYPES)})")
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise Unsupported("accelerate hooks (offloaded or split weights)")
    if len({p.device for p in model.parameters()}) != 1:
        raise Unsupported("parameters on several devices")


class FastDecoder:
    """The decode step of a Llama-architecture model, exactly as HF computes it, with far fewer ops.

    Construct it with :meth:`for_model`.  ``fuse`` (int8 models only) stacks each
    layer's q, k and v rows into one packed matrix: one product instead of three,
    measured 58 against 93 us per layer at one row with the loader's int8 Linears
    (31 against 62 with torch.ao's), 37 us less at 8 rows, ~1 ms per SmolLM2-135M
    step, for that extra packed copy: ``fused_bytes`` (16.6 MB for SmolLM2-135M).
    """

    def __init__(self, model: torch.nn.Module, fuse: bool = True, exact_drafts: bool = True) -> None:
        _check_architecture(model)
        config, body = model.config, model.model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.groups = self.heads // self.kv_heads
        attention = body.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scale = attention.scaling
        self.eps = body.norm.variance_epsilon
        self.hidden = config.hidden_size
        self.embed = body.embed_tokens.weight
        self.device, self.dtype = self.embed.device, self.embed.dtype
        linears = [m for layer in body.layers for m in _linears(layer)] + [model.lm_head]
        self.kinds = sorted({kind_of(m) for m in linears})
        qkv_width = (self.heads + 2 * self.kv_heads) * self.head_dim
        guard_columns = 2 if "int8-per-token" in self.kinds else 0
        fused_bytes = len(body.layers) * (self.hidden + guard_columns) * qkv_width
        # The stacked copy pays for small models (~1 ms of a ~12 ms step for 16.6 MB); a 7B model's would
        # take ~1.6 GB for a gain lost in its step's time.
        self.fused = fuse and bool({"int8", "int8-per-token"} & set(self.kinds)) and fused_bytes <= FUSE_LIMIT_BYTES
        self.fused_bytes = fused_bytes if self.fused else 0
        self.layers = [self._layer_of(layer) for layer in body.layers]
        self.final_norm = body.norm.weight
        self.lm_head = projections([model.lm_head])
        rotary = body.rotary_emb
        self.rotary = _Rotary(rotary.inv_freq, float(rotary.attention_scaling), self.dtype,
                              min(config.max_position_embeddings, 4096))
        self._check_products(body.layers[0], model.lm_head)
        log.debug("fast decode step for %s: %s Linears, fused q/k/v %s (+%.1f MB)", type(model).__name__,
                  ", ".join(self.kinds), self.fused, self.fused_bytes / 1e6)
        # Verify drafts with each token's attention computed as a one-token step does (see _attention_by_position).
        self.exact_drafts = exact_drafts
        self._run: Callable[..., torch.Tensor] = self._forward
        self._compiled: Callable[..., torch.Tensor] | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, compile: bool = False, fuse: bool = True) -> FastDecoder | None:
        """A FastDecoder over ``model``'s own weights, or None (reason logged at debug) when unsupported."""
        try:
            decoder = cls(model, fuse=fuse)
        except Unsupported as exc:
            log.debug("no fast decode step for %s: %s", type(model).__name__, exc)
            return None
        if compile:
            decoder.compile()
        return decoder

    def _layer_of(self, layer: torch.nn.Module) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        # Only q/k/v are fused: stacking gate/up measured 91 against 108 us per layer at one row, too
        # little for a packed copy of the largest matrices (53 MB for SmolLM2-135M); the two share the
        # input's per-token quantization work either way.
        return _Layer(input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
                      qkv=projections([attention.q_proj, attention.k_proj, attention.v_proj], fuse=self.fused),
                      o=projections([attention.o_proj]),
                      gate_up=projections([mlp.gate_proj, mlp.up_proj], split=True),
                      down=projections([mlp.down_proj]))

    def _check_products(self, layer: torch.nn.Module, lm_head: torch.nn.Module) -> None:
        """Raise Unsupported unless the first layer's and lm_head's products equal the modules' own, bit for bit."""
        ours = self.layers[0]
        checks = [(ours.qkv, _linears(layer)[:3], False), (ours.o, [layer.self_attn.o_proj], False),
                  (ours.gate_up, [layer.mlp.gate_proj, layer.mlp.up_proj], True),
                  (ours.down, [layer.mlp.down_proj], False), (self.lm_head, [lm_head], False)]
        generator = torch.Generator(device=self.device).manual_seed(0)
        for fn, modules, split in checks:
            width = getattr(modules[0], "in_features", None)
            if not isinstance(width, int):
                raise Unsupported(f"{type(modules[0]).__name__} has no in_features")
            # Rows of very different magnitudes: a per-tensor and a per-row quantization give different numbers.
            x = torch.randn(3, width, generator=generator, device=self.device, dtype=self.dtype)
            x = x * torch.tensor([[1.0], [30.0], [0.01]], device=self.device, dtype=self.dtype)
            with torch.inference_mode():
                expected = [m(x) for m in modules]
                got = fn(x)
                got = list(got) if split else list(got.split([e.shape[-1] for e in expected], dim=-1))
            if not all(torch.equal(g, e) for g, e in zip(got, expected)):
                log.warning("fast decode step: %s products differ from the modules' own (%s); not used",
                            type(modules[0]).__name__, ", ".join(self.kinds))
                raise Unsupported(f"{type(modules[0]).__name__} products differ from the modules' own")

    def compile(self) -> bool:
        """Run the layers through torch.compile from now on (float Linears only); whether it is on."""
        if self.kinds != ["float"]:
            log.info("fast decode step: torch.compile refused for %s Linears (dynamo cannot trace "
                     "fbgemm's packed op); running eager", ", ".join(self.kinds))
            return False
        # CUDA graphs remove the per-kernel launch cost that dominates small decode steps on a GPU.
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        try:
            self._compiled = torch.compile(self._forward, mode=mode)
        except Exception as exc:  # noqa: BLE001 - any failure to set up compilation means eager
            log.warning("fast decode step: torch.compile failed (%s: %s); running eager", type(exc).__name__, exc)
            return False
        self._run = self._run_compiled
        return True

    def _run_compiled(self, *args) -> torch.Tensor:
        try:
            return self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 - compilation errors surface at the first calls, of many kinds
            # The step only rewrites the last q cache columns, so running it again eagerly is safe; if
            # that raises too, the inputs were at fault, not compilation, and compile stays on.
            logits = self._forward(*args)
            log.warning("fast decode step: compiled step failed (%s: %s); running eager from now on",
                        type(exc).__name__, exc)
            self._run = self._forward
            return logits

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, layers: Sequence[KeysValues],
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Float logits [rows, q, vocab] of ``input_ids`` [rows, q] at rotary ``position_ids`` [rows, q].

        ``layers`` holds one (keys, values) per decoder layer, each [rows, kv_heads, L,
        head_dim]: the first L-q columns cached (rotated, as HF caches them), the last q
        written here in place.  ``mask`` [rows, L] (bool) marks real columns, the last q
        True; None means all are.  The new tokens see the real cached columns and each
        other causally.  Run it under ``torch.inference_mode()``.  On a GPU, reading the
        largest position to size the rotary table is the step's one host sync.
        """
        if len(layers) != len(self.layers):
            raise ValueError(f"{len(layers)} (keys, values) pairs for {len(self.layers)} layers")
        cos, sin = self.rotary.lookup(position_ids)
        attn_mask = self._attention_mask(mask, input_ids.shape[1], layers[0][0].shape[2])
        return self._run(input_ids, cos, sin, layers, attn_mask)

    def _attention_mask(self, mask: torch.Tensor | None, q: int, length: int) -> torch.Tensor | None:
        """Additive mask [rows or 1, 1, groups*q, L] for queries packed as in ``_pack``, or None (all visible).

        With ``exact_drafts`` each new token gets the one-token step's mask, cut at its own column.
        """
        if q == 1 or self.exact_drafts:
            if mask is None:
                return None
            visible = mask[:, None, None, :]
        else:
            # New token i (column length-q+i) sees every earlier column and itself.
            columns = torch.arange(length, device=self.device)
            visible = columns <= torch.arange(length - q, length, device=self.device)[:, None]  # [q, L]
            if mask is not None:
                visible = visible & mask[:, None, :]
            visible = visible.view(-1, 1, q, length).repeat(1, 1, self.groups, 1)
        # Built once per step as an additive float mask: SDPA would convert a bool mask in every layer.
        return torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, -torch.inf)

    def _forward(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 layers: Sequence[KeysValues], attn_mask: torch.Tensor | None) -> torch.Tensor:
        rows, q = input_ids.shape
        x = F.embedding(input_ids.reshape(-1), self.embed)  # [rows*q, hidden]: every product sees HF's rows
        for layer, (keys, values) in zip(self.layers, layers):
            x = self._layer(x, layer, keys, values, cos, sin, attn_mask)
        return self.lm_head(self._norm(x, self.final_norm)).view(rows, q, -1).float()

    def _layer(self, x: torch.Tensor, layer: _Layer, keys: torch.Tensor, values: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self._attention(self._norm(x, layer.input_norm), layer, keys, values, cos, sin, attn_mask)
        return x + self._mlp(self._norm(x, layer.post_norm), layer)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden,), weight, self.eps)
        # HF normalizes in float32, casts back, then scales in the model's dtype.
        return weight * F.rms_norm(x.float(), (self.hidden,), None, self.eps).to(x.dtype)

    def _attention(self, x: torch.Tensor, layer: _Layer, keys: torch.Tensor, values: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        rows, q = cos.shape[:2]
        heads, kv_heads = self.heads, self.kv_heads
        qkv = layer.qkv(x).view(rows, q, heads + 2 * kv_heads, self.head_dim)
        qk, value = qkv.split((heads + kv_heads, kv_heads), dim=2)
        # Queries and keys rotated in one product: measured 10 us against 20 us for two at one row.
        query, key = _rotate(qk, cos, sin).split((heads, kv_heads), dim=2)
        length = keys.shape[2]
        keys.narrow(2, length - q, q).copy_(key.transpose(1, 2))
        values.narrow(2, length - q, q).copy_(value.transpose(1, 2))
        if q > 1 and self.exact_drafts:
            return layer.o(self._attention_by_position(query, keys, values, attn_mask))
        out = F.scaled_dot_product_attention(self._pack(query), keys, values, attn_mask=attn_mask, scale=self.scale)
        return layer.o(self._unpack(out, rows, q))

    def _attention_by_position(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                               attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Each new token's attention as the one-token step computes it: same call, same columns.

        One call for all q tokens sums in another order (the kernel's blocks differ), and int8
        rounding turns such last-bit differences into different answers: 0 of 8 real prompts kept
        theirs with drafts verified in one call; per position, a lone sequence's answer is
        bit for bit the plain decoding's.
        """
        rows, q = query.shape[:2]
        length = keys.shape[2]
        outs = []
        for i in range(q):
            end = length - q + i + 1
            mask = None if attn_mask is None else attn_mask[..., :end]
            out = F.scaled_dot_product_attention(self._pack(query[:, i:i + 1]), keys[:, :, :end], values[:, :, :end],
                                                 attn_mask=mask, scale=self.scale)
            outs.append(self._unpack(out, rows, 1))
        return torch.stack(outs, dim=1).view(rows * q, -1)

    def _pack(self, query: torch.Tensor) -> torch.Tensor:
        """[rows, q, heads, dim] -> [rows, kv_heads, groups*q, dim]: each kv head's queries as one sequence.

        GQA without repeating keys/values (or enable_gqa): the query heads sharing a
        kv head attend to it together.  For q == 1 it is one view (4 ops fewer per layer).
        """
        rows, q = query.shape[:2]
        if q == 1:
            return query.view(rows, self.kv_heads, self.groups, self.head_dim)
        grouped = query.view(rows, q, self.kv_heads, self.groups, self.head_dim).permute(0, 2, 3, 1, 4)
        return grouped.reshape(rows, self.kv_heads, self.groups * q, self.head_dim)

    def _unpack(self, out: torch.Tensor, rows: int, q: int) -> torch.Tensor:
        """SDPA's [rows, kv_heads, groups*q, dim] back to [rows*q, heads*dim] rows in HF's order."""
        if q == 1:
            return out.view(rows, self.heads * self.head_dim)
        grouped = out.view(rows, self.kv_heads, self.groups, q, self.head_dim).permute(0, 3, 1, 2, 4)
        return grouped.reshape(rows * q, self.heads * self.head_dim)

    def _mlp(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        gate, up = layer.gate_up(x)
        return layer.down(F.silu(gate).mul_(up))


def _linears(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """A decoder layer's Linears: q, k, v, o, gate, up, down."""
    attention, mlp = layer.self_attn, layer.mlp
    return [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
            mlp.gate_proj, mlp.up_proj, mlp.down_proj]

