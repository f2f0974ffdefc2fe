"""The click front end of convfuse (installed as ``convfuse_cli``): parse, call, print, exit."""
