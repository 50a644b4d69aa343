"""RPO itself: the paper's prompts, preference data (negatives, rewards, labels), the objective
(L_sim + L_pref against a frozen reference UNet) and the training loop with validation-based
model selection. Sits on ``reward``, ``sd`` and below."""
