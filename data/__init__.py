"""RLDS reading and writing, dataset standardisation, rewards/returns, normalisation, torch loaders.

Nothing here imports TensorFlow except `data.rlds_writer`'s writer process.
"""
