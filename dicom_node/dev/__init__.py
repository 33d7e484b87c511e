"""Developer and demonstration tools: ``make demo`` (``demo``) and synthetic sample studies
(``samples``).  Never used by the running node.
"""
