"""Publishing a run to the Hugging Face Hub as pico-train does: hub.py (what is sent, idempotent, retried) and
background.py (rank 0's child process, so that training never waits for the network)."""
