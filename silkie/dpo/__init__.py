"""DPO: the preference losses and the step that scores answers (plain and efficient paths)."""
