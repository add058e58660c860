from keyproxy.cli import main

raise SystemExit(main())
