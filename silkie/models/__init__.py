"""Model families supported by Silkie."""
