from mkdt.cli import main

raise SystemExit(main())
