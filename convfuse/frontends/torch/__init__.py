"""The torch front end: trace a module into the planner's IR, write the plan back into the module."""
