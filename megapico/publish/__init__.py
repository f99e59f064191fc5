"""Publishing a run to the Hugging Face Hub as pico-train does: hub.py (what is sent, idempotent, retried; every file
made anew or checked), pico_run.py (a pico run directory: megapico's converted one or pico-train's own) and
background.py (rank 0's child process, so that training never waits for the network)."""
