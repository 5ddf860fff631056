from cope_local.cli import main

raise SystemExit(main())
