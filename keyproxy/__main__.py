from keyproxy.commands.cli import main

raise SystemExit(main())
