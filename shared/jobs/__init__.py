"""Job-runner glue shared by the API and the worker (no web or queue framework imported here)."""
