"""Q-SFT: Q-learning as supervised fine-tuning of a VLA/VLM on robot action tokens (reference/qsft.md).

- qsft.py: the loss math (targets, soft-label cross-entropy, selection rule) and QSFTModel
- backbone.py: the project's tokenized VLA and Hugging Face VLMs behind one interface
- policy.py: `policy=qsft` and the Q-SFT critic for steering other policies
- training.py: the train_qsft.py loop
- config.py: schemas (policy, vlm group, train_qsft)
"""
