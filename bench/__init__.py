"""Side-by-side benchmark of FauxPilot Lite against a naive transformers server and llama.cpp's server.

Run ``python -m bench --help``; see bench/README.md.
"""
