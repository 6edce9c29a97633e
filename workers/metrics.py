"""Prometheus metrics of the worker: is the GPU the bottleneck, and where does time go?"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

GENERATOR_BUSY_SECONDS = Counter(
    "gcr_generator_busy_seconds_total",
    "Seconds the generator spent inside pipeline calls; its rate is the GPU busy fraction.",
)
GENERATOR_BATCH_SIZE = Histogram(
    "gcr_generator_batch_size", "Requests per pipeline call.", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32)
)
GENERATOR_QUEUE_WAIT = Histogram(
    "gcr_generator_queue_wait_seconds",
    "Time a generation request waited for the GPU.",
    buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
STAGE_SECONDS = Histogram(
    "gcr_stage_seconds",
    "Wall time of one stage of one round.",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
CRITIC_INFLIGHT = Gauge("gcr_critic_inflight", "Critic requests in flight.")
CRITIC_TOKENS = Counter(
    "gcr_critic_tokens_total", "Tokens the reward model read (prompt) and wrote (completion).", ["kind"]
)
PROMPTS_CUT = Counter("gcr_prompts_cut_total", "Round prompts shortened to what the generator's text encoder reads.")
CRITIC_ERRORS = Counter("gcr_critic_errors_total", "Critic calls that failed after retries.", ["code"])
JOBS_INFLIGHT = Gauge("gcr_worker_jobs_inflight", "Jobs this worker is running.")
JOBS_NEEDED = Gauge(
    "gcr_worker_jobs_needed", "Jobs this worker's measured stage times say keep its generator busy (Little's law)."
)
CRITIQUE_LIMIT = Gauge("gcr_worker_critique_limit", "Critiques this worker keeps in flight now (adaptive, AIMD).")
JOBS_FINISHED = Counter("gcr_worker_jobs_finished_total", "Jobs this worker finished.", ["status", "reason"])
ROUNDS = Counter("gcr_worker_rounds_total", "Rounds checkpointed.")
DEAD_LETTERS = Counter("gcr_worker_dead_letters_total", "Jobs failed after exhausting their attempts.")
HOPS = Counter(
    "gcr_worker_hops_total", "Jobs this worker handed to another model's stream for their next round.", ["to_model"]
)
