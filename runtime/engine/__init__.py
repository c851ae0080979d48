"""The engine: requests become sequences; the scheduler and block manager pick each step's batch; the
executor runs it; sampled tokens are appended, detokenized and streamed back."""
