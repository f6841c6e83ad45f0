"""Search methods: each one file, each giving the architecture step of a search (the loop is pynas.search).

``darts``: DARTS first and second order, for the CNN and RNN spaces; ``base``: what they share.
"""
