"""Proto <-> engine conversion: requests in (with validation), outputs out."""
from __future__ import annotations

import uuid

from lumen.engine.core.request import FinishReason, GenerationRequest, RequestOutput
from lumen.engine.errors import InvalidRequestError
from lumen.engine.sampling.logprobs import TokenLogprob
from lumen.engine.sampling.sampler import SamplingParams
from lumen.engine.speculative import SpecMethod, SpeculativeParams
from lumen.engine.tokenizer.tokenizer import Tokenizer
from lumen.v1 import inference_pb2 as pb

FINISH_TO_PROTO = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
}


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    def opt(name: str, default: float) -> float:
        return getattr(msg, name) if msg.HasField(name) else default

    return SamplingParams(
        temperature=opt("temperature", 1.0),
        top_k=msg.top_k,
        top_p=opt("top_p", 1.0),
        min_p=msg.min_p,
        repetition_penalty=opt("repetition_penalty", 1.0),
        seed=msg.seed if msg.HasField("seed") else None,
    )


def speculative_from_proto(msg: pb.SpeculativeOptions) -> SpeculativeParams:
    """Empty method / unset num_tokens take the server's defaults; bad values raise InvalidRequestError."""
    method = SpecMethod.parse(msg.method, "speculative.method") if msg.method else None
    return SpeculativeParams(method, msg.num_tokens if msg.HasField("num_tokens") else None)


def check_request_fields(req: pb.GenerateRequest) -> None:
    """Checks of the request's shape; the limits, SamplingParams and the engine check sizes, ranges and ids."""
    if req.prompt and req.prompt_token_ids:
        raise InvalidRequestError("prompt", "set either prompt or prompt_token_ids, not both")


def prompt_ids_for(req: pb.GenerateRequest, tokenizer: Tokenizer) -> list[int]:
    """Token ids as given, or the tokenized prompt (BOS added as the model's metadata says)."""
    if req.prompt_token_ids:
        return list(req.prompt_token_ids)
    add_special = req.add_special_tokens if req.HasField("add_special_tokens") else True
    return tokenizer.encode(req.prompt, add_special_tokens=add_special, parse_special=req.parse_special)


def generation_request(req: pb.GenerateRequest | pb.ChatRequest, prompt_ids: list[int], context_length: int,
                       default_max_new_tokens: int) -> GenerationRequest:
    """The engine request for a Generate or a Chat (which has no prompt_logprobs)."""
    if req.stopping.HasField("max_new_tokens"):
        max_new = req.stopping.max_new_tokens
    else:
        # Unset: the server default, clipped to what the context leaves (as vLLM does).
        max_new = max(1, min(default_max_new_tokens, context_length - len(prompt_ids)))
    return GenerationRequest(
        request_id=req.request_id or uuid.uuid4().hex,
        prompt_ids=prompt_ids,
        max_new_tokens=max_new,
        sampling=sampling_from_proto(req.sampling),
        stop=list(req.stopping.stop),
        ignore_eos=req.stopping.ignore_eos,
        stop_token_ids=list(req.stopping.stop_token_ids),
        logprobs=req.logprobs or req.top_logprobs > 0,
        top_logprobs=req.top_logprobs,
        prompt_logprobs=getattr(req, "prompt_logprobs", False),
        speculative=speculative_from_proto(req.speculative),
        adapter=req.adapter,
        lora_scale=req.lora_scale if req.HasField("lora_scale") else 1.0,
    )


def _logprob_to_proto(lp: TokenLogprob, tokenizer: Tokenizer) -> pb.TokenLogprob:
    def text(token_id: int) -> str:
        return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    return pb.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob, text=text(lp.token_id),
        top=[pb.TopLogprob(token_id=t, logprob=v, text=text(t)) for t, v in lp.top],
    )


def response_from_output(out: RequestOutput, tokenizer: Tokenizer, trace_id: str) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=out.request_id,
        text=out.text,
        token_ids=out.token_ids,
        logprobs=[_logprob_to_proto(lp, tokenizer) for lp in out.logprobs],
        prompt_logprobs=[_logprob_to_proto(lp, tokenizer) for lp in out.prompt_logprobs],
    )
    if out.finished:
        msg.finish_reason = FINISH_TO_PROTO[out.finish_reason]
        msg.usage.prompt_tokens = out.prompt_tokens
        msg.usage.completion_tokens = out.completion_tokens
        msg.usage.cached_tokens = out.cached_tokens
        msg.usage.draft_tokens = out.draft_tokens
        msg.usage.accepted_draft_tokens = out.accepted_tokens
        msg.usage.acceptance_rate = out.accepted_tokens / out.draft_tokens if out.draft_tokens else 0.0
        msg.trace_id = trace_id
        msg.stop_sequence = out.stop_sequence
        if out.stop_token_id is not None:
            msg.stop_token_id = out.stop_token_id
    return msg
