"""Goodput: what interruptions cost a run, recorded per attempt, and the checkpoint interval that minimises it.

`events` writes each attempt's timestamped phases into the run dir as the run goes;
`accounting` turns the records of all attempts into productive time and badput
categories; `interval` chooses when to checkpoint (`--checkpoint-every N|DURATION|auto`).
"""
