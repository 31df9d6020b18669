"""task=serve's /metrics through prometheus_client, with vLLM's metric names and meanings under the
prefix `internlm_tp:` (a dashboard made for vLLM needs only `vllm:` changed): requests running and
waiting, prompt and generation token counters, time to first token, time per output token, end-to-end
latency, and finished requests by reason. Ours beside them: prompt tokens the model actually ran
(`prefill_tokens_computed`: a prompt answered n times counts once), decode steps and the host time
their token choices took (`token_choice_seconds`: what sampling costs a step, against greedy)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "internlm_tp:"
# vLLM's buckets for these histograms
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


class ServeMetrics:
    def __init__(self, running, waiting):
        """running(), waiting(): the request counts now (read at each scrape)."""
        self.registry = r = CollectorRegistry()
        self._seen: dict = {}
        Gauge(PREFIX + "num_requests_running", "Number of requests in model execution batches.",
              registry=r).set_function(running)
        Gauge(PREFIX + "num_requests_waiting", "Number of requests waiting to be processed.",
              registry=r).set_function(waiting)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Number of prefill tokens processed.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Number of generation tokens processed.",
                                         registry=r)
        self.prefill_computed = Counter(PREFIX + "prefill_tokens_computed",
                                        "Prompt tokens run through the model (a prompt answered n times: once).",
                                        registry=r)
        self.decode_steps = Counter(PREFIX + "decode_steps", "Decode steps run.", registry=r)
        self.token_choice = Counter(PREFIX + "token_choice_seconds",
                                    "Host time the decode steps spent choosing their tokens (greedy or sampled).",
                                    registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Count of finished requests by finish reason.",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "Histogram of time per output token in seconds.", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
                             buckets=E2E_BUCKETS, registry=r)

    def follow(self, engine) -> None:
        """The engine's own counters, brought up to date (they only grow)."""
        for counter, value in ((self.prefill_computed, engine.prefilled_tokens), (self.decode_steps, engine.decode_steps),
                               (self.token_choice, engine.choice_s)):
            counter.inc(value - self._seen.get(counter, 0))
            self._seen[counter] = value

    def finished(self, prompt_tokens: int, reason: str, e2e_s: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.request_success.labels(finished_reason=reason).inc()
        self.e2e.observe(e2e_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
