"""The study: the method judged against its controls (single, per-task, random groups) over seeds."""
