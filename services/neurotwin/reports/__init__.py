"""Reports over journaled data: numbers (``*_summary``) kept apart from rendering (``*_report``)."""
