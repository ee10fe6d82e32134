"""llama.cpp in this process, from xllamacpp's prebuilt CPU wheel (llama-cpp-python compiles for ~25 min).

xllamacpp runs llama.cpp's own server code; its native endpoints on the loopback address give greedy
tokens for a prompt given as token ids and llama.cpp's tokenization of a text.
"""

import json
import urllib.request
from contextlib import contextmanager


class LlamaCpp:
    def __init__(self, server):
        self.server = server

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.server.listening_address + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """Up to `n` argmax tokens after `ids`; fewer when one is an end-of-generation token, which ends them."""
        return self._post("/completion", {"prompt": ids, "n_predict": n, "samplers": ["top_k"], "top_k": 1,
                                          "temperature": 0, "cache_prompt": False, "return_tokens": True})["tokens"]

    def next_logprobs(self, ids: list[int], k: int, plain: int) -> dict[int, float]:
        """The `k` most likely next tokens after `ids` and their log-probabilities, from the raw logits.

        The pick itself is forced to `plain`, a token that is whole text: the server reports nothing for
        an end-of-generation pick, and holds back a token that is part of a UTF-8 character."""
        step = self._post("/completion", {"prompt": ids, "n_predict": 1, "n_probs": k, "samplers": ["top_k"],
                                          "top_k": 1, "temperature": 0, "cache_prompt": False,
                                          "logit_bias": [[plain, 1000.0]]})
        return {p["id"]: p["logprob"] for p in step["completion_probabilities"][0]["top_logprobs"]}

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """llama.cpp's tokens for `text`, special tokens parsed; `add_special`: BOS/EOS as the GGUF says."""
        return self._post("/tokenize", {"content": text, "add_special": add_special, "parse_special": True})["tokens"]


@contextmanager
def llama_cpp(path, n_ctx: int = 512):
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = n_ctx
    params.n_parallel = 1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
    params.warmup = False
    params.verbosity = 0  # errors only
    # f32 throughout, as transformers computes: llama.cpp's default f16 cache and its CPU flash attention
    # (f16 products) move logits by ~1e-2, enough to flip a greedy pick between two close tokens.
    params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
    params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    client = LlamaCpp(xllamacpp.Server(params))
    try:
        yield client
    finally:
        client.server = None  # the last reference: the server stops and frees the model
