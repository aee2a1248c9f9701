"""Offline batch generation: `LLM(model_path, **engine_args).generate(prompts, params)`."""
from tqdm.auto import tqdm

from engine.engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams


class LLM(LLMEngine):
    """An LLMEngine with a blocking `generate` (vLLM's offline API)."""

    def generate(self, prompts: list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order. One
        SamplingParams applies to all prompts, or give one per prompt."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine: requests added with "
                               "add_request are still running (step() them to completion)")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} "
                             "SamplingParams (give one, or one per prompt)")
        request_ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                request_ids.append(self.add_request(prompt, params))
        except ValueError:
            for request_id in request_ids:   # all or nothing
                self.abort(request_id)
            raise
        outputs = {}
        start, num_tokens = self.clock(), 0
        with tqdm(total=len(prompts), desc="Generating", disable=not use_tqdm,
                  dynamic_ncols=True) as bar:
            while self.has_unfinished():
                for out in self.step():
                    outputs[out.request_id] = out
                    num_tokens += len(out.token_ids)
                    bar.set_postfix_str(f"{num_tokens / (self.clock() - start):.0f} output tok/s",
                                        refresh=False)
                    bar.update(1)
        return [outputs[i] for i in request_ids]
