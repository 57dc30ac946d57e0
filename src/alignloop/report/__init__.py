"""What train/ and evaluate/ both report: statistics, figures, markdown, training and reward-model reports."""
