"""Paging: where each page of optimizer state lives (host memory or the job's state file) and how it moves.

The page table (metadata), the residency policy (which pages stay), the host budget (how many pages
each job may keep), the host pool (the buffers), transfers and state files (the moves), and the pagers
that the engine drives through one interface (stated.paging.pager).
"""
